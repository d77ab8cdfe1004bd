from src.callbacks.hf_export import HFExport
from src.callbacks.reference_refresh import ReferenceRefresh

__all__ = ["HFExport", "ReferenceRefresh"]
