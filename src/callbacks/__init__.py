from src.callbacks.checkpoint import Checkpoint
from src.callbacks.ema import EMA
from src.callbacks.finite_loss import FiniteLossGuard
from src.callbacks.hf_export import HFExport
from src.callbacks.reference_refresh import ReferenceRefresh
from src.callbacks.scalerl_curve import ScaleRLCurve
from src.callbacks.validate_at_end import ValidateAtEnd
from src.callbacks.wandb_axes import WandbAxes

__all__ = ["Checkpoint", "EMA", "FiniteLossGuard", "HFExport", "ReferenceRefresh", "ScaleRLCurve", "ValidateAtEnd", "WandbAxes"]
