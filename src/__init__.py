"""genlight: post-training and diffusion algorithms as PyTorch Lightning modules, with Hydra configs shipped in the
package (`pkg://genlight.conf`).

    import lightning as L
    import genlight
    from genlight import DPOModule, LMDataModule, ArithmeticTask, tiny_llama, char_tokenizer

    tok = char_tokenizer()
    module = DPOModule(net=tiny_llama, tokenizer=tok)          # the defaults are conf/algo/dpo.yaml's recipe
    data = LMDataModule(ArithmeticTask(), tok, kind=DPOModule.DATA_KIND, batch_size=64)
    L.Trainer(**genlight.trainer_defaults(module, max_steps=100)).fit(module, data)

Every name below is imported on first use: `import genlight` itself loads no Lightning, W&B, vLLM or textarena, only
OmegaConf, to register the resolvers the shipped configs use (a Hydra app of yours that composes them just imports
genlight first).
"""

from __future__ import annotations

import importlib

from genlight.resolvers import register_resolvers

register_resolvers()

# name -> the module that defines it (one place; `__all__` is its keys)
_EXPORTS = {
    # the algorithms, one LightningModule each
    "SFTModule": "genlight.lightning_modules.sft",
    "DPOModule": "genlight.lightning_modules.dpo",
    "KTOModule": "genlight.lightning_modules.kto",
    "RewardModelModule": "genlight.lightning_modules.reward_model",
    "RLVRModule": "genlight.lightning_modules.rlvr",
    "Recipe": "genlight.rl.recipe",  # RLVRModule's options as one typed object
    "DistillModule": "genlight.lightning_modules.distill",
    "DDPMModule": "genlight.lightning_modules.ddpm",
    # their losses, usable alone
    "dpo_loss": "genlight.lightning_modules.dpo",
    "kto_loss": "genlight.lightning_modules.kto",
    "bradley_terry_loss": "genlight.lightning_modules.reward_model",
    # data
    "LMDataModule": "genlight.datamodules.lm",
    "RowKind": "genlight.datamodules.lm",
    "ArithmeticTask": "genlight.datamodules.arithmetic",
    "FileSource": "genlight.datamodules.files",
    "DataError": "genlight.datamodules.files",
    "ReasoningGymTask": "genlight.datamodules.reasoning_gym",
    "ImageDataModule": "genlight.datamodules.images",
    "Toy2DDataModule": "genlight.datamodules.toy2d",
    # networks and tokenizers
    "tiny_llama": "genlight.models.lm",
    "from_pretrained": "genlight.models.lm",
    "char_tokenizer": "genlight.models.tokenizer",
    "load_tokenizer": "genlight.models.tokenizer",
    "unet2d": "genlight.models.diffusion",
    "mlp2d": "genlight.models.diffusion",
    # verifiers and reward models (RLVR's `reward`)
    "Verifier": "genlight.rewards",
    "ExactAnswer": "genlight.rewards",
    "NumericAnswer": "genlight.rewards",
    "MathVerify": "genlight.rewards",
    "FunctionReward": "genlight.rewards",
    "RewardModel": "genlight.rewards",
    # callbacks
    "ReferenceRefresh": "genlight.callbacks.reference_refresh",
    "ScaleRLCurve": "genlight.callbacks.scalerl_curve",
    "EMA": "genlight.callbacks.ema",
    "ValidateAtEnd": "genlight.callbacks.validate_at_end",
    "FiniteLossGuard": "genlight.callbacks.finite_loss",
    "HFExport": "genlight.callbacks.hf_export",
    # the shipped configs from Python
    "compose": "genlight.config",
    "trainer_defaults": "genlight.config",
    "algorithm_config": "genlight.config",
}
_EXPORTS_HERE = ("register_resolvers",)
__all__ = sorted([*_EXPORTS, *_EXPORTS_HERE])
__version__ = "0.1.0"


def __getattr__(name: str):
    if name in _EXPORTS:
        value = getattr(importlib.import_module(_EXPORTS[name]), name)
        globals()[name] = value  # once
        return value
    raise AttributeError(f"module 'genlight' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
