from src.callbacks.hf_export import HFExport

__all__ = ["HFExport"]
