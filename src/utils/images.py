"""Sample pictures: image grids (diffusers' `make_image_grid`) and 2-D scatter plots (matplotlib), as
uint8 arrays for W&B (floats would be saved black) and PNG files in the run directory."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch


def to_pil_grid(x: torch.Tensor, scale: int = 4, cols: int | None = None):
    """(N, C, H, W) in [-1, 1] -> one PIL image, a near-square grid, each image enlarged `scale` times."""
    from diffusers.utils import make_image_grid
    from PIL import Image, ImageOps

    a = ((x.detach().float().cpu().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
    mode = "L" if a.shape[-1] == 1 else "RGB"
    imgs = [Image.fromarray(i.squeeze(-1) if mode == "L" else i, mode) for i in a]
    if scale > 1:
        imgs = [i.resize((i.width * scale, i.height * scale), Image.Resampling.NEAREST) for i in imgs]
    imgs = [ImageOps.expand(i, border=1, fill=128) for i in imgs]  # a grey frame between neighbours
    cols = cols or math.ceil(math.sqrt(len(imgs)))
    rows = math.ceil(len(imgs) / cols)
    imgs += [Image.new(mode, imgs[0].size)] * (rows * cols - len(imgs))
    return make_image_grid(imgs, rows=rows, cols=cols)


def scatter_png(x: torch.Tensor, title: str = "", ref: torch.Tensor | None = None):
    """(N, 2) points -> a PIL scatter plot (held-out points in grey behind, if given)."""
    import io

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from PIL import Image

    fig, ax = plt.subplots(figsize=(4, 4), dpi=80)
    if ref is not None:
        ax.scatter(*ref.cpu().T.numpy(), s=2, c="0.75", label="data")
    ax.scatter(*x.detach().float().cpu().T.numpy(), s=2, c="C0", label="samples")
    ax.set_xlim(-3, 3)
    ax.set_ylim(-3, 3)
    ax.set_aspect("equal")
    ax.set_title(title, fontsize=9)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", bbox_inches="tight")
    plt.close(fig)
    buf.seek(0)
    return Image.open(buf).convert("RGB")


def picture(x: torch.Tensor, title: str = ""):
    return scatter_png(x, title) if x.dim() == 2 else to_pil_grid(x)


def log_samples(module, key: str, samples: torch.Tensor, caption: str = "") -> None:
    """Log a sample picture to every logger that takes images (W&B) and save it as a PNG in the run dir."""
    trainer = module.trainer
    if not trainer.is_global_zero or len(samples) == 0:
        return
    img = picture(samples, caption)
    out = Path(trainer.default_root_dir) / "samples"
    out.mkdir(parents=True, exist_ok=True)
    img.save(out / f"{key.replace('/', '_')}_step{trainer.global_step:06d}.png")
    for logger in trainer.loggers:
        if hasattr(logger, "log_image"):
            logger.log_image(key=key, images=[np.asarray(img)], caption=[caption], step=trainer.global_step)
