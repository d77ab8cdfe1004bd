"""Compute-bound SFT benchmark: a 33.6 M-parameter Llama (hidden 512, 8 layers) on variable-length rows
(prompt + completion 90-250 tokens, as real data is), where a step is matmul work, not Python overhead.

    OMP_WAIT_POLICY=PASSIVE python bench/sft_packing_speed.py [--rounds 3] [--steps 4] [--batch 8]

Variants, run alternately in each round on the same data, model init, optimizer and clipping:
  bare        a plain PyTorch loop over our padded batches (forward, completion-only loss, clip, fused AdamW)
  ours        SFTModule through Lightning's Trainer, padded batches
  ours_packed SFTModule, data.packing=true (padding-free: one row, per-sequence position_ids)
  trl         TRL's SFTTrainer, its default (padded) setup, prompt-completion data (completion-only loss)
  trl_pf      TRL's SFTTrainer with padding_free=True (its best setup that runs on CPU)
Throughput is real (non-pad) tokens per second; MFU = 6 x params x real tokens/s over this CPU's measured
fp32 matmul peak (2 threads). Medians and min-max over the rounds. TRL: pip install -e ".[bench]".
"""

from __future__ import annotations

import argparse
import platform
import random
import statistics
import tempfile
import time

import lightning as L
import torch

from src.datamodules.lm import LMDataModule
from src.lightning_modules.lm import masked_nll
from src.lightning_modules.sft import SFTModule
from src.models import char_tokenizer, tiny_llama

LR, CLIP, WARMUP_STEPS = 3e-4, 1.0, 1
ALPHABET = "abcdefghijklmnopqrstuvwxyz0123456789 "


def cpu_name() -> str:
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def matmul_peak(n: int = 1536, reps: int = 5) -> float:
    """Measured fp32 matmul FLOP/s on this machine and thread count (median of reps)."""
    a, b = torch.randn(n, n), torch.randn(n, n)
    a @ b
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        a @ b
        times.append(time.perf_counter() - t)
    return 2 * n**3 / statistics.median(times)


def make_rows(n: int, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        total = rng.randint(90, 250)
        p = rng.randint(20, 60)
        rows.append({"prompt": "".join(rng.choices(ALPHABET, k=p)), "completion": "".join(rng.choices(ALPHABET, k=total - p))})
    return rows


class Rows:
    def __init__(self, rows):
        self._rows = [(f"row {i}", r) for i, r in enumerate(rows)]

    def rows(self, split):
        return self._rows


def model(tok):
    return tiny_llama(tok, hidden_size=512, num_layers=8, num_heads=8, intermediate_size=2048,
                      max_position_embeddings=512, seed=0)


def datamodule(tok, rows, batch: int, packing: bool) -> LMDataModule:
    dm = LMDataModule(Rows(rows), tok, kind="sft", batch_size=batch, max_length=512, packing=packing, seed=0)
    dm.setup("fit")
    return dm


def real_tokens(batch: dict) -> int:
    return int(batch["attention_mask"].sum()) if "attention_mask" in batch else batch["input_ids"].numel()


def bare(tok, rows, batch: int, steps: int) -> tuple[float, int]:
    net = model(tok)
    opt = torch.optim.AdamW(net.parameters(), lr=LR, fused=True)
    loader = datamodule(tok, rows, batch, packing=False).train_dataloader()
    it = iter(loader)
    tokens, t0 = 0, None
    for step in range(WARMUP_STEPS + steps):
        if step == WARMUP_STEPS:
            t0 = time.perf_counter()
        b = next(it)
        loss, _ = masked_nll(net(input_ids=b["input_ids"], attention_mask=b["attention_mask"], use_cache=False).logits,
                             b["labels"])
        loss.backward()
        torch.nn.utils.clip_grad_norm_(net.parameters(), CLIP)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if step >= WARMUP_STEPS:
            tokens += real_tokens(b)
    return time.perf_counter() - t0, tokens


class Clock(L.Callback):
    def __init__(self):
        self.t0, self.tokens = None, 0

    def on_train_batch_start(self, trainer, module, batch, batch_idx):
        if trainer.global_step == WARMUP_STEPS:
            self.t0 = time.perf_counter()

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        if self.t0 is not None:
            self.tokens += real_tokens(batch)

    def on_train_end(self, trainer, module):
        self.elapsed = time.perf_counter() - self.t0


def ours(tok, rows, batch: int, steps: int, packing: bool) -> tuple[float, int]:
    module = SFTModule(net=lambda tokenizer: model(tokenizer), tokenizer=tok, lr=LR, warmup_steps=0, min_lr_ratio=1.0)
    clock = Clock()
    trainer = L.Trainer(accelerator="cpu", max_steps=WARMUP_STEPS + steps, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
                        num_sanity_val_steps=0, gradient_clip_val=CLIP, callbacks=[clock])
    trainer.fit(module, datamodule=datamodule(tok, rows, batch, packing))
    return clock.elapsed, clock.tokens


def trl(tok, rows, batch: int, steps: int, padding_free: bool) -> tuple[float, int]:
    from datasets import Dataset
    from transformers import TrainerCallback
    from trl import SFTConfig, SFTTrainer

    class TrlClock(TrainerCallback):
        t0 = None

        def on_step_begin(self, args, state, control, **kw):
            if state.global_step == WARMUP_STEPS:
                self.t0 = time.perf_counter()

        def on_train_end(self, args, state, control, **kw):
            self.elapsed = time.perf_counter() - self.t0

    clock = TrlClock()
    with tempfile.TemporaryDirectory() as out:
        args = SFTConfig(output_dir=out, max_steps=WARMUP_STEPS + steps, per_device_train_batch_size=batch,
                         learning_rate=LR, lr_scheduler_type="constant", max_grad_norm=CLIP, report_to=[],
                         logging_strategy="no", save_strategy="no", use_cpu=True, max_length=512,
                         padding_free=padding_free, dataloader_num_workers=0, optim="adamw_torch_fused")
        trainer = SFTTrainer(model=model(tok), args=args, train_dataset=Dataset.from_list(rows), processing_class=tok,
                             callbacks=[clock])
        trainer.train()
    # TRL samples its own batches: count the expected real tokens of `steps` batches of this data
    mean_len = statistics.mean(len(tok(r["prompt"] + r["completion"])["input_ids"]) + 1 for r in rows)
    return clock.elapsed, int(steps * batch * mean_len)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--variants", default="bare,ours,ours_packed,trl,trl_pf")
    args = ap.parse_args()
    torch.set_num_threads(2)
    tok = char_tokenizer()
    rows = make_rows(args.batch * (WARMUP_STEPS + args.steps) * 4)
    n_params = sum(p.numel() for p in model(tok).parameters())
    peak = matmul_peak()
    print(f"CPU: {cpu_name()}; torch threads: {torch.get_num_threads()}; model: {n_params / 1e6:.1f} M params; "
          f"batch {args.batch}, rows 90-250 tokens; measured fp32 matmul peak {peak / 1e9:.1f} GFLOP/s")
    runners = {
        "bare": lambda: bare(tok, rows, args.batch, args.steps),
        "ours": lambda: ours(tok, rows, args.batch, args.steps, packing=False),
        "ours_packed": lambda: ours(tok, rows, args.batch, args.steps, packing=True),
        "trl": lambda: trl(tok, rows, args.batch, args.steps, padding_free=False),
        "trl_pf": lambda: trl(tok, rows, args.batch, args.steps, padding_free=True),
    }
    names = args.variants.split(",")
    results: dict[str, list[float]] = {n: [] for n in names}
    for r in range(args.rounds):
        for name in names:  # alternating: every variant once per round
            elapsed, tokens = runners[name]()
            results[name].append(tokens / elapsed)
            print(f"round {r + 1} {name:12s} {tokens / elapsed:8.1f} real tokens/s", flush=True)
    print(f"\n{'variant':12s} {'tokens/s median':>16s} {'min-max':>17s} {'MFU':>6s}")
    med = {n: statistics.median(v) for n, v in results.items()}
    for n, v in results.items():
        print(f"{n:12s} {med[n]:16.1f} {min(v):8.1f}-{max(v):<8.1f} {6 * n_params * med[n] / peak:6.1%}")
    for a, b in (("ours", "bare"), ("ours_packed", "bare"), ("ours_packed", "trl"), ("ours_packed", "trl_pf"), ("ours", "trl")):
        if a in med and b in med:
            print(f"{a} / {b}: {med[a] / med[b]:.2f}x")


if __name__ == "__main__":
    main()
