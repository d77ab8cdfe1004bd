from src.callbacks.hf_export import HFExport
from src.callbacks.reference_refresh import ReferenceRefresh
from src.callbacks.scalerl_curve import ScaleRLCurve

__all__ = ["HFExport", "ReferenceRefresh", "ScaleRLCurve"]
