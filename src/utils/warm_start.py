"""A short SFT before a preference or RL algorithm, when no SFT checkpoint is given.

DPO and RLVR start from an SFT policy (the lecture: "Pretrain -> SFT on good examples -> ...").
With the embedded default (a tiny model from scratch), `warm_start.steps` SFT steps on the same
task produce a deliberately imperfect starting policy, exported to `<run>/sft_init/` so the run
can be reproduced with `model=hf model.pretrained=<run>/sft_init`. Skipped when the model is a
checkpoint (`model=hf`), when resuming, or with `warm_start.steps=0`.
"""

from __future__ import annotations

import logging
from pathlib import Path

import hydra
import lightning as L
from omegaconf import DictConfig

from src.datamodules.files import DataError

log = logging.getLogger(__name__)


def sft_warm_start(cfg: DictConfig, tokenizer):
    """Return a `net` factory holding the SFT-trained model, or None when no warm start applies."""
    ws = cfg.get("warm_start")
    if not ws or not ws.get("steps") or cfg.get("ckpt_path") or "pretrained" in cfg.model:
        return None
    from src.lightning_modules.sft import SFTModule

    log.info("Warm start: %d SFT steps before %s", ws.steps, cfg.algo._target_.rsplit(".", 1)[-1])
    dm = hydra.utils.instantiate(cfg.data, tokenizer=tokenizer, kind="sft", batch_size=ws.get("batch_size", cfg.data.batch_size))
    try:
        dm.setup("fit")
    except DataError as e:
        raise DataError(
            f"{e}\nwarm_start runs SFT on the data, which needs SFT rows; give an SFT checkpoint instead "
            "(model=hf model.pretrained=DIR) or set warm_start.steps=0"
        ) from None
    sft = SFTModule(net=hydra.utils.instantiate(cfg.model.net), tokenizer=tokenizer, lr=ws.lr, warmup_steps=ws.get("warmup_steps", 50))
    trainer = L.Trainer(
        accelerator=cfg.trainer.accelerator, devices=1, max_steps=ws.steps, logger=False,
        enable_checkpointing=False, limit_val_batches=0, num_sanity_val_steps=0,
        gradient_clip_val=cfg.trainer.get("gradient_clip_val"), enable_model_summary=False,
        enable_progress_bar=cfg.trainer.get("enable_progress_bar", True),
    )
    trainer.fit(sft, datamodule=dm)
    if trainer.is_global_zero:
        out = Path(cfg.paths.output_dir) / "sft_init"
        sft.model.save_pretrained(out)
        tokenizer.save_pretrained(out)
        log.info("Warm-start SFT export: %s", out)
    model = sft.model

    def net(tokenizer):
        return model

    return net
