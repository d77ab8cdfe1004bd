"""Diffusion models: training a denoiser and sampling it (DDPM, DDIM, DPM-Solver++, Euler, Heun).

The module orchestrates; the math is one floor down, importable without Lightning:
  src/diffusion/processes.py  the forward processes ve (the lecture, Nakkiran et al. 2024), vp (Ho et al. 2020)
                              and flow (flow matching): marginals, training pairs, x0 from any target, reverse steps
  src/diffusion/samplers.py   one class per sampler, diffusers' scheduler shape (set_timesteps, step)
  src/models/diffusion.py     the networks (diffusers' UNet2DModel, an MLP for points)
Here: the training loss (Ho et al.'s simple loss, Min-SNR weighting), classifier-free guidance, evaluation with a
sample metric, the diffusers export.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from types import MappingProxyType
from typing import Literal

import lightning as L
import torch
from torch import nn

from genlight.diffusion.processes import make_process
from genlight.diffusion.samplers import check_sampler, make_sampler
from genlight.metrics import class_accuracy
from genlight.models.diffusion import net_from_spec, net_spec, with_class_embeddings
from genlight.optim import adamw_cosine
from genlight.utils.run import attached_trainer

log = logging.getLogger(__name__)
WEIGHTINGS = ("none", "min_snr")
# the forward process's options (conf/algo/ddpm.yaml's `algo.process`): vp with Ho et al.'s linear schedule
PROCESS = MappingProxyType({"name": "vp", "num_steps": 1000, "schedule": "linear", "beta_start": 1e-4, "beta_end": 0.02,
                            "sigma": 4.0, "logit_mean": 0.0, "logit_std": 1.0})


def denoiser(net) -> nn.Module:
    """The network from what `net` is: a module (as it is), a directory saved with `save_pretrained` (a diffusers
    model, or this project's export: a `DDPMPipeline` directory's unet), or a factory called with no argument."""
    import os

    if isinstance(net, nn.Module):
        return net
    if isinstance(net, (str, os.PathLike)):
        from genlight.models.diffusion import load_denoiser

        return load_denoiser(str(net))
    if callable(net):
        return net()
    raise TypeError(f"net: a {type(net).__name__} ({net!r:.60}); pass a denoising network (e.g. genlight.unet2d(...)), "
                    "a directory saved with save_pretrained, or a factory that returns one")


def check_denoiser(net: nn.Module) -> nn.Module:
    """The contract a denoiser must meet, checked before any training (each gap named): a `config` mapping that gives
    the sample shape (`sample_size` and `in_channels`, or `dim`); and, for its checkpoints to load (`from_checkpoint`,
    sample.py), a `from_config` classmethod to rebuild it (a warning without one). Diffusers' `ModelMixin` +
    `ConfigMixin` with `@register_to_config` give both."""
    if not isinstance(net, nn.Module):
        raise TypeError(f"net: a {type(net).__name__}, not a torch.nn.Module")
    config = getattr(net, "config", None)
    name = type(net).__name__
    how = ("(subclass diffusers' ModelMixin and ConfigMixin and decorate __init__ with @register_to_config, as "
           "genlight.models.diffusion.TimeMLP does)")
    if config is None or not hasattr(config, "keys"):
        raise ValueError(f"net: {name} has no `config`: the module reads the sample shape from it and rebuilds the "
                         f"network from it when loading a checkpoint {how}")
    if not ({"sample_size", "in_channels"} <= set(config.keys()) or "dim" in config):
        raise ValueError(f"net: {name}.config has neither `sample_size` and `in_channels` (images) nor `dim` (points): "
                         f"the module draws its samples in that shape; its keys are {sorted(config.keys())}")
    if not callable(getattr(type(net), "from_config", None)):  # trains and samples; its checkpoints cannot rebuild it
        log.warning("net: %s has no `from_config`: it trains and samples, but a checkpoint holds the network's config, "
                    "not its code, so DDPMModule.from_checkpoint / sample.py cannot rebuild it %s", name, how)
    return net


class DDPMModule(L.LightningModule):
    DASHBOARD = [  # the W&B workspace's sections (sweeps/dashboard.py)
        ("Training", [
            ("line", "denoising loss", "trainer/global_step", ["train/loss", "val/loss"]),
            ("line", "learning rate", "trainer/global_step", ["lr-AdamW"]),
        ]),
        ("Sample quality", [
            ("line", "Frechet distance to held-out digits (lower is better)", "trainer/global_step", ["val/fd"]),
            ("line", "energy distance to held-out points (2-D data)", "trainer/global_step", ["val/energy_distance"]),
            ("media", "samples (EMA weights)", ["val/samples"]),
        ]),
    ]

    def __init__(
        self,
        net: nn.Module | str | Callable[[], nn.Module],
        process: Mapping = PROCESS,
        target: str | None = None,
        clip_x0: float | str | None = "auto",
        lr: float = 2e-3,
        weight_decay: float = 0.0,
        betas: tuple[float, float] = (0.9, 0.999),
        warmup_steps: int = 100,
        min_lr_ratio: float = 0.1,
        val_sampler: str | None = None,
        val_steps: int = 50,
        val_num_samples: int = 1000,
        test_sampler: str | None = None,
        test_steps: int = 50,
        test_num_samples: int = 1000,
        sample_batch_size: int = 1000,
        num_logged_samples: int = 64,
        loss_weighting: Literal["none", "min_snr"] = "none",
        snr_gamma: float = 5.0,
        class_conditional: bool = False,
        num_classes: int | None = None,
        cond_drop_prob: float = 0.1,
        guidance_scale: float = 0.0,
        t_sampling: str = "uniform",
        shift: float = 1.0,
        flow_grid: str = "even",
        seed: int = 42,
    ):
        """A diffusion model (or a flow) of the data the DataModule yields: (B, ...) tensors, or (x, labels) for a
        class-conditional model. The defaults are conf/algo/ddpm.yaml's, each option explained beside its value there.

        Args:
            net: the denoiser (its contract: `check_denoiser`): a diffusers-style network called as
                net(x_t, t[, class_labels=]) returning a tensor of x_t's shape (or an output with `.sample`), whose
                `config` gives the sample shape (`sample_size` and `in_channels`, or `dim` for points) and that
                rebuilds from it (`from_config`: checkpoints hold the config, not the code); `genlight.unet2d`,
                `genlight.mlp2d`, any diffusers `UNet2DModel`. Or a directory saved with `save_pretrained`, or a
                factory called with no argument that returns such a network.
            process: the forward process's options, `name` (vp | ve | flow), `num_steps`, ... (keys not given take
                `PROCESS`'s values).
            target: what the network predicts; None: the process's own (vp / ve: eps; flow: velocity).
            The rest: see conf/algo/ddpm.yaml."""
        process = {**PROCESS, **process}
        net = check_denoiser(denoiser(net))
        super().__init__()
        # the process first: its own target and sampler fill a null (vp / ve: eps, ddim; flow: velocity, euler)
        proc = make_process(**process, t_sampling=t_sampling, shift=shift, flow_grid=flow_grid)
        target = target or proc.targets[0]
        val_sampler = val_sampler or proc.default_sampler
        test_sampler = test_sampler or proc.default_sampler
        proc.check_target(target)
        if loss_weighting not in WEIGHTINGS:
            raise ValueError(f"algo.loss_weighting={loss_weighting!r}: must be one of {list(WEIGHTINGS)}")
        if loss_weighting not in proc.loss_weightings:
            raise ValueError(f"algo.loss_weighting={loss_weighting}: process={proc.name!r} takes "
                             f"{' | '.join(proc.loss_weightings)} (a flow shapes its time with algo.t_sampling)")
        if loss_weighting == "min_snr" and (snr_gamma <= 0 or target == "x_prev"):
            raise ValueError(f"algo.loss_weighting=min_snr: needs algo.snr_gamma > 0 (got {snr_gamma}) and a target "
                             f"eps, x0 or v (got {target!r})")
        if not 0 <= cond_drop_prob < 1:
            raise ValueError(f"algo.cond_drop_prob={cond_drop_prob}: must be in [0, 1)")
        if guidance_scale < 0:
            raise ValueError(f"algo.guidance_scale={guidance_scale}: must be >= 0 (0: conditional, no guidance)")
        if class_conditional and not num_classes:
            raise ValueError("algo.class_conditional=true needs labelled data, and data.num_classes is not set "
                             "(digits: 10; an image folder: one sub-folder per class, data.num_classes=K)")
        if guidance_scale > 0 and not class_conditional:
            raise ValueError(f"algo.guidance_scale={guidance_scale} needs a class-conditional model: "
                             "train with algo.class_conditional=true")
        for key, value in (("val_sampler", val_sampler), ("test_sampler", test_sampler)):
            check_sampler(value, proc, f"algo.{key}")
        for key, value in (("val_steps", val_steps), ("test_steps", test_steps)):
            if not 1 <= value <= proc.T:
                raise ValueError(f"algo.{key}={value}: must be between 1 and algo.process.num_steps={proc.T}")
        self.save_hyperparameters(ignore=["net"], logger=False)
        self.process = proc
        # classifier-free guidance: one extra class embedding, index num_classes, is the null label
        self.null_class = num_classes if class_conditional else None
        # trained in train mode: a saved network loads in eval mode, and Lightning keeps each module's mode
        self.net = (with_class_embeddings(net, num_classes + 1) if class_conditional else net).train()
        # the sample metric (data.metric), built in setup; in a dict so that it is no submodule (kept out of EMA,
        # parameters and checkpoints)
        self._eval: dict = {"metric": None}
        self._samples: dict[str, torch.Tensor] = {}
        self._class_accuracy: dict[str, torch.Tensor] = {}

    # ------------------------------------------------------------------ network
    def denoise(self, x: torch.Tensor, k: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        """The network's raw output at step k (eps, x0, v or the x_prev increment, per `target`); class-conditional
        models take `labels` (the null class `null_class` for the unconditional output)."""
        k = k.expand(x.shape[0]) if k.dim() == 0 else k
        kw = {"class_labels": labels} if labels is not None else {}
        out = self.net(x, self.process.net_time(k).to(x.device), **kw)
        return out.sample if hasattr(out, "sample") else out

    def guided(self, x: torch.Tensor, k: torch.Tensor, labels: torch.Tensor | None, w: float) -> torch.Tensor:
        """Classifier-free guidance (Ho & Salimans 2022): (1 + w) out(x, c) - w out(x, null); both in one batch.
        The same combination of eps, x0 or v predictions, since x0_hat is affine in the output."""
        if labels is None or w == 0:
            return self.denoise(x, k, labels)
        null = torch.full_like(labels, self.null_class)
        k2 = k.repeat(2) if k.dim() else k
        cond, uncond = self.denoise(torch.cat([x, x]), k2, torch.cat([labels, null])).chunk(2)
        return (1 + w) * cond - w * uncond

    def x0_hat(self, x: torch.Tensor, k: torch.Tensor, labels: torch.Tensor | None = None, w: float = 0.0,
               clip: bool = True) -> torch.Tensor:
        """E[x0 | x_k] from the (guided) network, clipped to the data range (`algo.clip_x0`) unless `clip` is off."""
        x0 = self.process.predict_x0(self.guided(x, k, labels, w), x, k, self.hparams.target)
        c = self.hparams.clip_x0 if clip else None
        if c == "auto":  # our image data lies in [-1, 1]; points are not clipped
            c = 1.0 if x0.dim() > 2 else None
        return x0.clamp(-c, c) if c is not None else x0  # Ho et al. clip x0 to the data range

    # ------------------------------------------------------------------ training
    def _rng(self, stage: str, step: int) -> torch.Generator:
        """Noise is a function of (seed, stage, step, rank): a resumed run draws what an unbroken one would."""
        salt = {"train": 0, "val": 1, "test": 2, "sample": 3}[stage]
        seed = (self.hparams.seed * 1_000_003 + step * 101 + salt) * 64 + self.global_rank
        return torch.Generator(device="cpu").manual_seed(seed % 2**63)

    def loss_weight(self, k: torch.Tensor) -> torch.Tensor | None:
        """Min-SNR-gamma (Hang et al. 2023): the x0-space weight min(SNR_t, gamma), expressed for the target the
        network predicts: eps min(SNR, gamma) / SNR, v min(SNR, gamma) / (SNR + 1), x0 min(SNR, gamma)."""
        if self.hparams.loss_weighting == "none":
            return None
        snr = self.process.snr(k)
        clipped = snr.clamp(max=self.hparams.snr_gamma)
        w = {"eps": clipped / snr, "v": clipped / (snr + 1), "x0": clipped}[self.hparams.target]
        return w.float()

    def split(self, batch) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(x0, labels): labels only for a class-conditional model (the data then yields them)."""
        x0, labels = batch if isinstance(batch, (tuple, list)) else (batch, None)
        if self.null_class is not None and labels is None:
            raise ValueError("algo.class_conditional=true but the data yields no labels")
        return x0, (labels if self.null_class is not None else None)

    def loss(self, x0: torch.Tensor, g: torch.Generator, labels: torch.Tensor | None = None) -> torch.Tensor:
        """Pick t uniformly from the grid, build (x_t, target), squared loss on predicting the target (per
        example, weighted by `loss_weight`); a conditional model sees the null class with `cond_drop_prob`."""
        k = self.process.sample_k(x0.shape[0], g).to(x0.device)
        x_t, y = self.process.training_pair(x0, k, self.hparams.target, g)
        if labels is not None:  # label dropout: the same network learns the unconditional model
            drop = torch.rand(labels.shape, generator=g).to(labels.device) < self.hparams.cond_drop_prob
            labels = labels.masked_fill(drop, self.null_class)
        out = self.denoise(x_t, k, labels)
        pred = x_t + out if self.hparams.target == "x_prev" else out  # x_prev: mu(x_t) = x_t + net(x_t, t)
        err = (pred - y).pow(2).flatten(1).mean(1)
        w = self.loss_weight(k)
        return (err * w).mean() if w is not None else err.mean()

    def training_step(self, batch, batch_idx: int) -> torch.Tensor:
        x0, labels = self.split(batch)
        loss = self.loss(x0, self._rng("train", self.global_step), labels)
        self.log("train/loss", loss, prog_bar=True, batch_size=x0.shape[0])
        return loss

    # ------------------------------------------------------------------ sampling
    @torch.no_grad()
    def sample(
        self,
        n: int,
        sampler: str = "ddpm",
        steps: int | None = None,
        generator: torch.Generator | None = None,
        x_T: torch.Tensor | None = None,
        shape: tuple[int, ...] | None = None,
        labels: torch.Tensor | int | None = None,
        guidance_scale: float | None = None,
    ) -> torch.Tensor:
        """n samples by simulating the reverse process from x_T ~ prior on `steps` grid points (default: all T).
        A class-conditional model draws class `labels` (one int, or (n,); default: every class in turn) with
        guidance w = `guidance_scale` (default: algo.guidance_scale)."""
        scheduler = make_sampler(sampler, self.process)
        labels, w = self.sample_labels(n, labels, guidance_scale)
        shape = shape or self.sample_shape
        out = []
        bs = self.hparams.sample_batch_size
        for i in range(0, n, bs):
            m = min(bs, n - i)
            c = labels[i : i + m].to(self.device) if labels is not None else None
            x = x_T[i : i + m].to(self.device) if x_T is not None else self.process.prior((m, *shape), generator, self.device)
            scheduler.set_timesteps(steps or self.process.T)
            for k in scheduler.timesteps:
                x0 = self.x0_hat(x, torch.tensor(k, device=self.device), c, w, clip=scheduler.clip_x0)
                x = scheduler.step(x0, k, x, generator)
            out.append(x)
        return torch.cat(out)

    def sample_labels(self, n: int, labels, guidance_scale) -> tuple[torch.Tensor | None, float]:
        """The (n,) class labels to draw and the guidance scale, checked against what the model was trained for."""
        w = self.hparams.guidance_scale if guidance_scale is None else guidance_scale
        if self.null_class is None:
            if labels is not None or w:
                raise ValueError(f"label={labels}, guidance={w}: this model is unconditional (trained without "
                                 "algo.class_conditional=true); sample it without a label or guidance")
            return None, 0.0
        if w < 0:
            raise ValueError(f"guidance={w}: must be >= 0")
        if labels is None:
            return torch.arange(n) % self.null_class, w  # every class in turn
        labels = torch.full((n,), labels) if isinstance(labels, int) else torch.as_tensor(labels).long()
        bad = labels[(labels < 0) | (labels >= self.null_class)]
        if bad.numel():
            raise ValueError(f"label={bad[0].item()}: outside the model's classes 0..{self.null_class - 1}")
        if labels.shape != (n,):
            raise ValueError(f"labels: {tuple(labels.shape)} for {n} samples")
        return labels, w

    @property
    def sample_shape(self) -> tuple[int, ...]:
        cfg = self.net.config
        if "sample_size" in cfg:
            size = cfg["sample_size"]
            size = (size, size) if isinstance(size, int) else tuple(size)
            return (cfg["in_channels"], *size)
        return (cfg["dim"],)

    # ------------------------------------------------------------------ evaluation
    @property
    def _metric(self):
        return self._eval["metric"]

    def setup(self, stage: str) -> None:
        dm = getattr(attached_trainer(self), "datamodule", None)
        if self._metric is None and dm is not None:
            from genlight.metrics import sample_metric

            self._eval["metric"] = sample_metric(getattr(dm, "metric", "loss"), self.sample_shape)

    def _eval_start(self, stage: str) -> None:
        hp = self.hparams
        n = hp[f"{stage}_num_samples"]
        trainer = attached_trainer(self)
        if n <= 0 or (self._metric is None and trainer is not None and trainer.sanity_checking):
            return
        if self._metric is None:  # no sample metric for this data: samples for the picture only
            n = min(n, hp.num_logged_samples)
        # test: the same noise whoever evaluates the checkpoint (the test after fit, eval.py), so its score is a
        # function of its weights; val: varies with the step
        g = self._rng(stage, self.global_step if stage == "val" else 0)
        labels, _ = self.sample_labels(n, None, None)  # a conditional model: every class in turn
        self._samples[stage] = self.sample(n, hp[f"{stage}_sampler"], hp[f"{stage}_steps"], generator=g, labels=labels)
        if self._metric is None:
            return
        self._metric.to(self.device)
        self._metric.reset()
        self._metric.update(self._samples[stage], real=False)
        if labels is not None and self._metric.name == "fd":  # digits: did the sampler draw the asked class?
            self._class_accuracy[stage] = class_accuracy(self._samples[stage], labels.to(self.device))

    def on_validation_epoch_start(self) -> None:
        # runs after the EMA callback swapped in the averaged weights, so samples come from the EMA model
        self._eval_start("val")

    def on_test_epoch_start(self) -> None:
        self._eval_start("test")

    def _eval_step(self, batch, batch_idx: int, stage: str) -> None:
        x0, labels = self.split(batch)
        loss = self.loss(x0, self._rng(stage, batch_idx), labels)  # fixed noise per batch: comparable across evaluations
        self.log(f"{stage}/loss", loss, batch_size=x0.shape[0])
        if stage in self._samples and self._metric is not None:
            self._metric.update(x0, real=True)

    def validation_step(self, batch, batch_idx):
        self._eval_step(batch, batch_idx, "val")

    def test_step(self, batch, batch_idx):
        self._eval_step(batch, batch_idx, "test")

    def _eval_end(self, stage: str) -> None:
        samples = self._samples.pop(stage, None)
        if samples is None:
            return
        hp = self.hparams
        tag = f"{hp[f'{stage}_sampler']}{hp[f'{stage}_steps']}"
        if self._metric is not None:
            name = self._metric.name
            value = self._metric.compute().float()
            self.log(f"{stage}/{name}", value, prog_bar=True)
            self.log(f"{stage}/{name}_{tag}", value)  # the same figure, the sampler and step count in its name
        if stage in self._class_accuracy:
            self.log(f"{stage}/class_accuracy", self._class_accuracy.pop(stage))
        from genlight.utils.images import log_samples

        shown = samples if samples.dim() == 2 else samples[: hp.num_logged_samples]  # 2-D: the whole cloud
        log_samples(self, f"{stage}/samples", shown, caption=f"{tag}, step {self.global_step}")

    def on_validation_epoch_end(self) -> None:
        self._eval_end("val")

    def on_test_epoch_end(self) -> None:
        self._eval_end("test")

    # ------------------------------------------------------------------ optimisation / checkpoints
    def configure_optimizers(self):
        hp = self.hparams
        groups = [{"params": list(self.net.parameters()), "weight_decay": hp.weight_decay}]
        return adamw_cosine(self, groups, hp.lr, hp.betas, hp.warmup_steps, hp.min_lr_ratio)

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint["net_spec"] = net_spec(self.net)  # rebuild the network without the Hydra config (sample.py)

    def diffusers_scheduler(self):
        """The diffusers scheduler with this process's schedule (None where diffusers has none: ve, flow)."""
        return self.process.diffusers_scheduler(self.hparams.target, self.hparams.clip_x0)

    def export_pretrained(self, path) -> None:
        """The (EMA) network as a diffusers directory; a vp UNet as a `DDPMPipeline` (unet + scheduler). Rank 0
        writes (every process calls it at the end of fit)."""
        from diffusers import DDPMPipeline, UNet2DModel

        if self.global_rank != 0:  # 0 without a trainer
            return
        sched = self.diffusers_scheduler()
        if sched is not None and isinstance(self.net, UNet2DModel):
            DDPMPipeline(unet=self.net, scheduler=sched).save_pretrained(path)
        else:
            self.net.save_pretrained(path)

    @classmethod
    def from_checkpoint(cls, path: str, map_location: str = "cpu") -> DDPMModule:
        """The module from one of our checkpoints; its weights are the EMA ones when EMA was on."""
        from genlight.utils.run import load_checkpoint

        ckpt = load_checkpoint(path, "ckpt", map_location)  # weights-only: loading runs no code
        if "net_spec" not in ckpt:
            raise ValueError(f"{path}: not a DDPMModule checkpoint (no 'net_spec' key)")
        module = cls(net=net_from_spec(ckpt["net_spec"]), **ckpt["hyper_parameters"])
        module.load_state_dict(ckpt["state_dict"])
        return module.eval()
