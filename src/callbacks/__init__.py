from genlight.callbacks.checkpoint import Checkpoint
from genlight.callbacks.ema import EMA
from genlight.callbacks.finite_loss import FiniteLossGuard
from genlight.callbacks.hf_export import HFExport
from genlight.callbacks.reference_refresh import ReferenceRefresh
from genlight.callbacks.scalerl_curve import ScaleRLCurve
from genlight.callbacks.validate_at_end import ValidateAtEnd
from genlight.callbacks.wandb_axes import WandbAxes

__all__ = ["Checkpoint", "EMA", "FiniteLossGuard", "HFExport", "ReferenceRefresh", "ScaleRLCurve", "ValidateAtEnd", "WandbAxes"]
