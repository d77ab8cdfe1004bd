"""Denoising networks for DDPMModule. The diffusion math lives in src/lightning_modules/ddpm.py; the
networks are library ones: diffusers' `UNet2DModel` for images, and for 2-D points an MLP built from
diffusers' sinusoidal time embedding. Both are diffusers `ModelMixin`s, so a checkpoint can rebuild
them from `net.config` and an export loads with `from_pretrained`.

Every network is called as `net(x, timestep)` and returns a tensor shaped like x (or an object with
`.sample`, as diffusers models do).
"""

from __future__ import annotations

import importlib

import torch
from diffusers import ModelMixin, UNet2DModel
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.embeddings import TimestepEmbedding, Timesteps
from torch import nn


def unet2d(
    image_size: int,
    channels: int,
    block_out_channels: tuple[int, ...] = (32, 32, 64),
    layers_per_block: int = 1,
    attention: bool = False,
    norm_num_groups: int = 8,
    dropout: float = 0.0,
) -> UNet2DModel:
    """A small `UNet2DModel` (Ho et al.'s architecture family) for `image_size`^2 images. Each block but
    the last halves the resolution; `attention` puts self-attention in the middle block's neighbours."""
    n = len(block_out_channels)
    if image_size % 2 ** (n - 1):
        raise ValueError(
            f"model.net: image_size={image_size} is not divisible by 2^{n - 1} "
            f"(block_out_channels={list(block_out_channels)} halves it {n - 1} times)"
        )
    down = ["DownBlock2D"] * n
    up = ["UpBlock2D"] * n
    if attention and n > 1:
        down[-2], up[1] = "AttnDownBlock2D", "AttnUpBlock2D"
    return UNet2DModel(
        sample_size=image_size,
        in_channels=channels,
        out_channels=channels,
        block_out_channels=tuple(block_out_channels),
        down_block_types=tuple(down),
        up_block_types=tuple(up),
        layers_per_block=layers_per_block,
        norm_num_groups=norm_num_groups,
        add_attention=attention,
        dropout=dropout,
    )


class TimeMLP(ModelMixin, ConfigMixin):
    """eps/x0 network for points in R^d: [x, emb(t)] -> MLP -> R^d, with the transformer-style
    sinusoidal embedding of the timestep (diffusers' `Timesteps`) followed by a learned projection."""

    @register_to_config
    def __init__(self, dim: int = 2, hidden: int = 256, depth: int = 3, time_dim: int = 64,
                 num_class_embeds: int | None = None):
        super().__init__()
        self.time_proj = Timesteps(time_dim, flip_sin_to_cos=True, downscale_freq_shift=0)
        self.time_emb = TimestepEmbedding(time_dim, hidden)
        # a label embedding added to the time embedding, as UNet2DModel's `num_class_embeds` does
        self.class_emb = nn.Embedding(num_class_embeds, hidden) if num_class_embeds else None
        self.inp = nn.Linear(dim, hidden)
        self.blocks = nn.ModuleList(nn.Sequential(nn.SiLU(), nn.Linear(hidden, hidden)) for _ in range(depth))
        self.out = nn.Sequential(nn.SiLU(), nn.Linear(hidden, dim))

    def forward(self, x: torch.Tensor, timestep: torch.Tensor, class_labels: torch.Tensor | None = None) -> torch.Tensor:
        t = timestep.expand(x.shape[0]) if timestep.dim() == 0 else timestep
        h = self.inp(x) + self.time_emb(self.time_proj(t).to(x.dtype))
        if self.class_emb is not None:
            if class_labels is None:
                raise ValueError("this network is class-conditional: pass class_labels")
            h = h + self.class_emb(class_labels)
        for block in self.blocks:
            h = h + block(h)  # residual MLP blocks
        return self.out(h)


def mlp2d(dim: int = 2, hidden: int = 256, depth: int = 3, time_dim: int = 64) -> TimeMLP:
    return TimeMLP(dim=dim, hidden=hidden, depth=depth, time_dim=time_dim)


def with_class_embeddings(net: nn.Module, n: int) -> nn.Module:
    """`net` with an embedding of n class labels (added to its time embedding): UNet2DModel's `num_class_embeds`
    (class_embed_type None), TimeMLP's own. The network is rebuilt from its config (fresh weights) unless it
    already has it."""
    if net.config.get("num_class_embeds") == n:
        return net
    if not isinstance(net, (UNet2DModel, TimeMLP)):
        raise ValueError(f"algo.class_conditional=true: {type(net).__name__} has no class embedding")
    config = {k: v for k, v in net.config.items() if not k.startswith("_")}  # (diffusers' own bookkeeping keys)
    return type(net).from_config({**config, "num_class_embeds": n})


def net_spec(net: nn.Module) -> dict:
    """What a checkpoint needs to rebuild `net`: its class and diffusers config."""
    cls = type(net)
    return {"class": f"{cls.__module__}.{cls.__qualname__}", "config": dict(net.config)}


def net_from_spec(spec: dict) -> nn.Module:
    module, _, name = spec["class"].rpartition(".")
    cls = getattr(importlib.import_module(module), name)
    if not hasattr(cls, "from_config"):
        raise ValueError(f"the checkpoint's network {spec['class']} has no `from_config`: it cannot be rebuilt from the "
                         "config the checkpoint holds (a denoiser for checkpoints is a diffusers ModelMixin + ConfigMixin)")
    return cls.from_config(spec["config"])


def load_denoiser(path: str) -> nn.Module:
    """A denoiser saved with `save_pretrained`: a diffusers model's directory (its config.json names the class: a
    diffusers one, or `TimeMLP`), or a `DDPMPipeline` directory (DDPMModule's export of a UNet: its `unet/`)."""
    import json
    from pathlib import Path

    import diffusers

    root = Path(path)
    if (root / "unet" / "config.json").is_file():
        root = root / "unet"
    if not (root / "config.json").is_file():
        raise FileNotFoundError(f"net={path}: no config.json there (nor in unet/): not a directory saved with "
                                "save_pretrained")
    name = json.loads((root / "config.json").read_text()).get("_class_name")
    cls = {"TimeMLP": TimeMLP}.get(name) or getattr(diffusers, str(name), None)
    if cls is None:
        raise ValueError(f"net={path}: config.json names the class {name!r}, neither a diffusers model nor TimeMLP")
    return cls.from_pretrained(str(root))
