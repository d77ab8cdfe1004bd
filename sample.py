"""Draw samples from a trained diffusion checkpoint and write a PNG grid (or 2-D scatter plot):

    python sample.py ckpt=logs/train/runs/<run>/checkpoints/last.ckpt sampler=ddim steps=50 n=64
    python sample.py ckpt=... label=3 guidance=2.0     # a class-conditional model: one class, guided

The samples themselves are saved beside the PNG as a tensor (.pt), in the data's scale ([-1, 1] images).
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import hydra
import torch
from omegaconf import DictConfig

import genlight  # noqa: F401  (sets PROJECT_ROOT for conf/paths)
from genlight.lightning_modules.ddpm import DDPMModule
from genlight.utils import register_resolvers
from genlight.utils.images import picture

log = logging.getLogger(__name__)
register_resolvers()


def sample(cfg: DictConfig) -> Path:
    if not Path(cfg.ckpt).is_file():
        raise FileNotFoundError(f"ckpt={cfg.ckpt}: no such file")
    device = cfg.device if cfg.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    module = DDPMModule.from_checkpoint(cfg.ckpt).to(device)
    module.hparams.sample_batch_size = cfg.batch_size
    g = torch.Generator().manual_seed(cfg.seed)
    t0 = time.perf_counter()
    x = module.sample(cfg.n, sampler=cfg.sampler, steps=cfg.steps, generator=g, labels=cfg.get("label"),
                      guidance_scale=cfg.get("guidance"))
    dt = time.perf_counter() - t0
    out = Path(cfg.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    picture(x, f"{cfg.sampler}-{cfg.steps or module.process.T}, {Path(cfg.ckpt).name}").save(out)
    torch.save(x.cpu(), out.with_suffix(".pt"))
    log.info("%d samples (%s, %s steps) in %.1f s (%.1f ms each): %s", cfg.n, cfg.sampler,
             cfg.steps or module.process.T, dt, 1000 * dt / cfg.n, out)
    return out


@hydra.main(version_base="1.3", config_path="conf", config_name="sample")
def main(cfg: DictConfig) -> None:
    sample(cfg)


if __name__ == "__main__":
    main()
