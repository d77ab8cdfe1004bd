"""DDPM benchmark on the digits default: our DDPMModule (Lightning) against a bare PyTorch loop and
against diffusers' own training recipe and pipelines, on identical work.

    OMP_WAIT_POLICY=PASSIVE python bench/ddpm_speed.py [--steps 40] [--rounds 3] [--budget 120] [--n-fd 1000] [--seeds 3]
    OMP_WAIT_POLICY=PASSIVE python bench/ddpm_speed.py --budget-steps 500,1200 --seeds 3 --ddpm-seeds 3

Identical work everywhere: the default UNet2DModel config (same seed), the 1297 train digits, batch 128,
the linear beta schedule with T = 1000, epsilon prediction and MSE, AdamW(lr 2e-3, betas 0.9/0.999, no
weight decay), warmup 100 then a flat lr (the run's length is unknown to both), grad-norm clip 1.0, EMA 0.995
with warm-up (min(0.995, (1 + n) / (10 + n)), diffusers' EMAModel default), fp32, 2 CPU threads, no logging,
no progress bars.

1. Step time: `--steps` optimizer steps of ours (Trainer.fit, EMA callback on) and of a bare loop (the
   same forward, loss, optimizer and EMA, no Lightning), alternating for `--rounds`; medians.
2. Equal budget: each trains for `--budget` seconds, or for each of `--budget-steps` optimizer steps (the same
   figure on any machine) (ours through Trainer.fit; diffusers through
   its train_unconditional recipe: DDPMScheduler.add_noise, EMAModel, get_scheduler), then the EMA
   model draws `--n-fd` samples with DDPM-1000 (one seed) and DDIM-50 (`--seeds` seeds) (ours: DDPMModule.sample; diffusers:
   DDPMPipeline / DDIMPipeline with their default settings), scored by FD against the 500 held-out
   digits; sampling time per image for each.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import lightning as L
import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from machine import cpu_name  # noqa: E402  (bench/machine.py)

from genlight.callbacks import EMA  # noqa: E402
from genlight.datamodules.images import ImageDataModule, digits_split  # noqa: E402
from genlight.lightning_modules.ddpm import DDPMModule  # noqa: E402
from genlight.metrics import sample_metric  # noqa: E402
from genlight.models.diffusion import unet2d  # noqa: E402

BATCH, LR, T, DECAY, WARMUP = 128, 2e-3, 1000, 0.995, 100
PROCESS = {"name": "vp", "num_steps": T, "schedule": "linear", "beta_start": 1e-4, "beta_end": 0.02}


def net(seed: int = 0):
    torch.manual_seed(seed)
    return unet2d(8, 1)


class StopAfter(L.Callback):
    """Stops after n optimizer steps or s seconds of training, whichever first; times the training steps."""

    def __init__(self, steps: int | None = None, seconds: float | None = None):
        self.steps, self.seconds, self.t0, self.elapsed = steps, seconds, None, 0.0

    def on_train_batch_start(self, trainer, *args):
        if self.t0 is None:
            self.t0 = time.perf_counter()

    def on_train_batch_end(self, trainer, *args):
        self.elapsed = time.perf_counter() - self.t0
        if (self.steps and trainer.global_step >= self.steps) or (self.seconds and self.elapsed >= self.seconds):
            trainer.should_stop = True


def ours(steps: int | None = None, seconds: float | None = None, total: int = 10**9) -> tuple[DDPMModule, int, float]:
    module = DDPMModule(net=net(), process=PROCESS, lr=LR, warmup_steps=WARMUP, min_lr_ratio=0.1,
                        val_num_samples=0, test_num_samples=0, seed=0)
    stop = StopAfter(steps, seconds)
    trainer = L.Trainer(accelerator="cpu", max_steps=total, max_epochs=-1, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
                        gradient_clip_val=1.0, callbacks=[EMA(decay=DECAY), stop])
    trainer.fit(module, datamodule=ImageDataModule(batch_size=BATCH))
    return module, trainer.global_step, stop.elapsed


def _cosine(opt, total: int):
    from transformers import get_cosine_with_min_lr_schedule_with_warmup

    return get_cosine_with_min_lr_schedule_with_warmup(opt, WARMUP, total, min_lr_rate=0.1)


def bare(steps: int) -> float:
    """The same training step with no framework: noise, forward, loss, clip, AdamW, EMA."""
    model = net()
    ema = [p.detach().clone() for p in model.parameters()]
    opt = torch.optim.AdamW(model.parameters(), lr=LR, betas=(0.9, 0.999), weight_decay=0.0)
    sched = _cosine(opt, 10**9)
    abar = torch.cumprod(1 - torch.linspace(1e-4, 0.02, T, dtype=torch.float64), 0).float()
    x = digits_split()["train"]
    g = torch.Generator().manual_seed(0)
    order = torch.randperm(len(x), generator=g)
    t0, i = time.perf_counter(), 0
    for _ in range(steps):
        if (i + 1) * BATCH > len(x):
            order, i = torch.randperm(len(x), generator=g), 0
        x0 = x[order[i * BATCH : (i + 1) * BATCH]]
        i += 1
        t = torch.randint(0, T, (BATCH,), generator=g)
        eps = torch.randn(x0.shape, generator=g)
        a = abar[t].view(-1, 1, 1, 1)
        loss = F.mse_loss(model(a.sqrt() * x0 + (1 - a).sqrt() * eps, t).sample, eps)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        with torch.no_grad():
            torch._foreach_lerp_(ema, [p.detach() for p in model.parameters()], 1 - DECAY)
    return time.perf_counter() - t0


def diffusers_recipe(seconds: float | None = None, steps: int | None = None):
    """diffusers' examples/unconditional_image_generation/train_unconditional.py, on the same work."""
    from diffusers import DDPMScheduler
    from diffusers.optimization import get_scheduler
    from diffusers.training_utils import EMAModel

    model = net()
    noise_scheduler = DDPMScheduler(num_train_timesteps=T, beta_schedule="linear")
    opt = torch.optim.AdamW(model.parameters(), lr=LR, betas=(0.9, 0.999), weight_decay=0.0)
    lr_sched = get_scheduler("cosine", optimizer=opt, num_warmup_steps=WARMUP, num_training_steps=10**9)
    ema = EMAModel(model.parameters(), decay=DECAY, use_ema_warmup=False, model_cls=type(model), model_config=model.config)
    loader = torch.utils.data.DataLoader(digits_split()["train"], batch_size=BATCH, shuffle=True, drop_last=True)
    t0, n = time.perf_counter(), 0
    done = lambda: (seconds is not None and time.perf_counter() - t0 >= seconds) or (steps is not None and n >= steps)  # noqa: E731
    while not done():
        for x0 in loader:
            noise = torch.randn(x0.shape)
            t = torch.randint(0, T, (x0.shape[0],)).long()
            noisy = noise_scheduler.add_noise(x0, noise, t)
            loss = F.mse_loss(model(noisy, t).sample, noise)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            lr_sched.step()
            opt.zero_grad()
            ema.step(model.parameters())
            n += 1
            if done():
                break
    ema.copy_to(model.parameters())
    return model, noise_scheduler, n


def fd(samples: torch.Tensor, heldout: torch.Tensor) -> float:
    m = sample_metric("fd", (1, 8, 8))
    m.update(heldout, real=True)
    m.update(samples.clamp(-1, 1), real=False)
    return m.compute().item()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--budget", type=float, default=120.0, help="training seconds for each side in part 2")
    ap.add_argument("--n-fd", type=int, default=1000, help="samples per FD")
    ap.add_argument("--seeds", type=int, default=3, help="sampling seeds for the DDIM-50 FD")
    ap.add_argument("--budget-steps", default=None,
                    help="comma-separated training budgets in optimizer steps (machine-independent), e.g. 500,1200")
    ap.add_argument("--ddpm-seeds", type=int, default=1, help="sampling seeds for the DDPM-1000 FD")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--skip-quality", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    cpu = cpu_name()
    print(f"CPU: {cpu}, {torch.get_num_threads()} threads", flush=True)
    L.seed_everything(0, verbose=False)

    print(f"1) step time, {args.steps} steps, batch {BATCH}, {args.threads} threads")
    ours(steps=3), bare(3)  # warm-up
    o, b = [], []
    for r in range(args.rounds):
        _, n, sec = ours(steps=args.steps)
        o.append(sec / n)
        b.append(bare(args.steps) / args.steps)
        print(f"   round {r}: ours {1000 * o[-1]:.1f} ms/step, bare loop {1000 * b[-1]:.1f} ms/step")
    mo, mb = statistics.median(o), statistics.median(b)
    print(f"   median: ours {1000 * mo:.1f} ms, bare {1000 * mb:.1f} ms -> ours/bare = {mo / mb:.3f} "
          f"({100 * (mo / mb - 1):+.1f}%)")
    if args.skip_quality:
        return

    budgets = [("steps", int(b)) for b in args.budget_steps.split(",")] if args.budget_steps else [("s", args.budget)]
    for unit, b in budgets:
        quality(unit, b, args)


def quality(unit: str, budget: float, args) -> None:
    what = f"{budget} optimizer steps" if unit == "steps" else f"{budget:.0f} s of training"
    print(f"2) equal budget: {what} each, FD on {args.n_fd} samples vs 500 held-out digits", flush=True)
    heldout = digits_split()["val"]
    kw = {"steps": budget} if unit == "steps" else {"seconds": budget}
    module, n_ours, sec_ours = ours(**kw)
    module.eval()
    from diffusers import DDIMPipeline, DDIMScheduler, DDPMPipeline

    t0 = time.perf_counter()
    model, sched, n_diff = diffusers_recipe(**kw)
    sec_diff = time.perf_counter() - t0
    model.eval()
    print(f"   optimizer steps: ours {n_ours} in {sec_ours:.0f} s, diffusers {n_diff} in {sec_diff:.0f} s", flush=True)
    rows = []
    for sampler, steps, seeds in (("ddim", 50, args.seeds), ("ddpm", 1000, args.ddpm_seeds)):
        f_ours, f_diff, t_ours, t_diff = [], [], [], []
        for seed in range(seeds):
            g = torch.Generator().manual_seed(seed)
            t0 = time.perf_counter()
            x = module.sample(args.n_fd, sampler, steps, generator=g)
            t_ours.append((time.perf_counter() - t0) / args.n_fd)
            f_ours.append(fd(x, heldout))
            if sampler == "ddpm":
                pipe = DDPMPipeline(unet=model, scheduler=sched)
            else:
                pipe = DDIMPipeline(unet=model, scheduler=DDIMScheduler.from_config(sched.config))
            pipe.set_progress_bar_config(disable=True)
            t0 = time.perf_counter()
            with torch.no_grad():
                kw = {"eta": 0.0} if sampler == "ddim" else {}
                img = pipe(batch_size=args.n_fd, generator=torch.Generator().manual_seed(seed), num_inference_steps=steps,
                           output_type="np", **kw).images
            t_diff.append((time.perf_counter() - t0) / args.n_fd)
            f_diff.append(fd(torch.from_numpy(img).permute(0, 3, 1, 2) * 2 - 1, heldout))
        rows.append((f"{sampler.upper()}-{steps}", f_ours, f_diff, statistics.median(t_ours), statistics.median(t_diff)))

    def show(v):
        return f"{statistics.mean(v):.2f}" + (f" ± {statistics.stdev(v):.2f}" if len(v) > 1 else "")

    print(f"   {'sampler':<10} {'FD ours':>14} {'FD diffusers':>14} {'ms/img ours':>12} {'ms/img diffusers':>17}")
    for name, fo, fdf, to, tdf in rows:
        print(f"   {name:<10} {show(fo):>14} {show(fdf):>14} {1000 * to:12.2f} {1000 * tdf:17.2f}")
    print(f"   (FD mean ± sd over {args.seeds} sampling seeds for DDIM-50, {args.ddpm_seeds} for DDPM-1000)")
    floor = fd(digits_split()["train"][: args.n_fd], heldout)
    print(f"   FD floor (train vs held-out digits, {args.n_fd}): {floor:.2f}; DDIM-50 / DDPM-1000 FD (ours): "
          f"{statistics.mean(rows[0][1]) / statistics.mean(rows[1][1]):.2f}")


if __name__ == "__main__":
    main()
