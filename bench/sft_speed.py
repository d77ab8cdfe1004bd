"""SFT benchmark: (1) training throughput of the Lightning path against a bare PyTorch loop on
identical work, (2) wall-clock minutes to 95% val exact-match on 2-digit addition.

    OMP_WAIT_POLICY=PASSIVE python bench/sft_speed.py [--rounds 5] [--steps 60] [--skip-learning]

Both paths use the same model (default tiny Llama), the same batches, AdamW groups, schedule and
gradient clipping, on 2 torch threads; they run alternately and we report medians and the ratio.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import lightning as L
import torch
from hydra import compose, initialize_config_dir
from hydra.core.hydra_config import HydraConfig
from hydra.utils import instantiate
from machine import cpu_name  # bench/machine.py
from omegaconf import open_dict

import genlight  # noqa: F401
from genlight.models.logps import masked_nll
from genlight.utils import register_resolvers

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # train.py
CONF = str(ROOT / "conf")
WARMUP = 10


def config(tmp: str, *overrides: str):
    register_resolvers()
    with initialize_config_dir(config_dir=CONF, version_base="1.3"):
        cfg = compose("train", overrides=["logger=none", "extras.print_config=false", *overrides], return_hydra_config=True)
    with open_dict(cfg):
        cfg.paths.output_dir = cfg.hydra.runtime.output_dir = tmp
        cfg.hydra.job.num = 0
    HydraConfig().set_config(cfg)
    return cfg


def build(cfg):
    tok = instantiate(cfg.model.tokenizer)
    dm = instantiate(cfg.data, tokenizer=tok)
    dm.setup("fit")
    module = instantiate(cfg.algo, net=instantiate(cfg.model.net), tokenizer=tok)
    return dm, module


class Clock(L.Callback):
    """Wall time and completion tokens from the end of step WARMUP to the end of training."""

    def __init__(self):
        self.t0 = self.tokens = None

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step == WARMUP:
            self.t0, self.tokens = time.perf_counter(), 0
        elif self.t0 is not None:
            self.tokens += int(batch["attention_mask"].sum())

    def on_train_end(self, trainer, pl_module):
        self.elapsed = time.perf_counter() - self.t0


def lightning_tokens_per_s(cfg, steps: int, progress_bar: bool) -> float:
    dm, module = build(cfg)
    clock = Clock()
    trainer = L.Trainer(
        accelerator="cpu", max_steps=steps + WARMUP, logger=False, enable_checkpointing=False,
        enable_progress_bar=progress_bar, enable_model_summary=False, limit_val_batches=0,
        num_sanity_val_steps=0, gradient_clip_val=cfg.trainer.gradient_clip_val, callbacks=[clock],
    )
    trainer.fit(module, datamodule=dm)
    return clock.tokens / clock.elapsed


def bare_tokens_per_s(cfg, steps: int) -> float:
    """The same work without Lightning: model, batches, AdamW, schedule, clipping, masked CE."""
    dm, module = build(cfg)
    model = module.model.train()

    class T:  # configure_optimizers reads the stepping-batch count and the precision from its trainer
        estimated_stepping_batches = steps + WARMUP
        precision = "32-true"

    module.trainer = T
    conf = module.configure_optimizers()
    module.trainer = None
    opt, sched = conf["optimizer"], conf["lr_scheduler"]["scheduler"]
    def batches():  # epochs back to back, as the Trainer does
        while True:
            yield from dm.train_dataloader()

    loader = batches()
    tokens, t0 = 0, None
    for step in range(steps + WARMUP):
        batch = next(loader)
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        loss, _ = masked_nll(logits, batch["labels"])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.trainer.gradient_clip_val)
        opt.step()
        sched.step()
        if step + 1 == WARMUP:
            t0 = time.perf_counter()
        elif t0 is not None:
            tokens += int(batch["attention_mask"].sum())
    return tokens / (time.perf_counter() - t0)


def minutes_to(target: float, tmp: str) -> tuple[float | None, list]:
    """Train the default `python train.py algo=sft` config; wall minutes until val/exact_match >= target."""
    from genlight.pipeline import train

    class Watch(L.Callback):
        def __init__(self):
            self.t0, self.curve = time.perf_counter(), []

        def on_validation_end(self, trainer, pl_module):
            if not trainer.sanity_checking:
                em = float(trainer.callback_metrics["val/exact_match"])
                self.curve.append((trainer.global_step, round((time.perf_counter() - self.t0) / 60, 2), round(em, 3)))
                if em >= target:
                    trainer.should_stop = True

    cfg = config(tmp, "test=false", "callbacks=none", "trainer.enable_progress_bar=false")
    watch = Watch()
    from unittest import mock

    with mock.patch("train.instantiate_callbacks", return_value=[watch]):
        train(cfg)
    hit = [m for _, m, em in watch.curve if em >= target]
    return (hit[0] if hit else None), watch.curve


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--skip-learning", action="store_true")
    ap.add_argument("--skip-throughput", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    print(f"CPU: {cpu_name()}; torch threads: {torch.get_num_threads()}", flush=True)
    import tempfile

    tmp = tempfile.mkdtemp()
    cfg = config(tmp)
    ours, ours_bar, bare = [], [], []
    for r in range(0 if args.skip_throughput else args.rounds):  # alternate, so background load hits all alike
        bare.append(bare_tokens_per_s(cfg, args.steps))
        ours.append(lightning_tokens_per_s(cfg, args.steps, progress_bar=False))
        ours_bar.append(lightning_tokens_per_s(cfg, args.steps, progress_bar=True))
        print(f"round {r}: bare {bare[-1]:.0f} tok/s, lightning {ours[-1]:.0f}, lightning+rich bar {ours_bar[-1]:.0f}", flush=True)
    if bare:
        report(args, cfg, bare, ours, ours_bar)
    if not args.skip_learning:
        minutes, curve = minutes_to(0.95, tempfile.mkdtemp())
        print("\nlearning curve (step, minutes, val/exact_match):", curve)
        print(f"minutes to 95% val exact-match on 2-digit addition: {minutes}")


def report(args, cfg, bare, ours, ours_bar) -> None:
    mb, mo, mob = (statistics.median(x) for x in (bare, ours, ours_bar))
    spread = lambda v: f"({min(v):.0f}-{max(v):.0f})"  # noqa: E731
    print(f"\nthroughput, median (min-max) of {args.rounds} rounds, {args.threads} threads, batch {cfg.data.batch_size}:")
    print(f"  bare PyTorch loop        {mb:8.0f} tokens/s {spread(bare)}")
    print(f"  Lightning SFTModule      {mo:8.0f} tokens/s {spread(ours)}  ratio {mo / mb:.3f}")
    print(f"  Lightning + progress bar {mob:8.0f} tokens/s {spread(ours_bar)}  ratio {mob / mb:.3f}")


if __name__ == "__main__":
    main()
