"""Compute-bound SFT benchmark: a 33.6 M-parameter Llama (hidden 512, 8 layers) on variable-length rows
(prompt + completion 90-250 tokens, as real data is), where a step is matmul work, not Python overhead.

    OMP_WAIT_POLICY=PASSIVE python bench/sft_packing_speed.py [--rounds 3] [--steps 4] [--batch 8]

Variants, run alternately in each round on the same data, model init, optimizer and clipping:
  bare        a plain PyTorch loop over our padded batches (forward, completion-only loss, clip, fused AdamW)
  ours        SFTModule through Lightning's Trainer, padded batches
  ours_packed SFTModule, data.packing=true (padding-free: balanced rows of <= 512 tokens, per-sequence position_ids)
  trl         TRL's SFTTrainer, its default (padded) setup, prompt-completion data (completion-only loss)
  trl_pf      TRL's SFTTrainer with padding_free=True (its best setup that runs on CPU)
  *_bf16      the same under bf16 autocast (ours: trainer precision bf16-mixed; TRL: its default bf16=True,
              which TRL 1.16 turns on even on CPU; the fp32 variants set bf16=False)
Throughput is real (non-pad) tokens per second; MFU = 6 x params x real tokens/s over this CPU's measured
matmul peak at the variant's precision (2 threads). Medians and min-max over the rounds.
TRL: pip install -e ".[bench]".
"""

from __future__ import annotations

import argparse
import random
import statistics
import tempfile
import time

import lightning as L
import torch
from machine import cpu_name  # bench/machine.py

from genlight.datamodules.lm import LMDataModule
from genlight.lightning_modules.sft import SFTModule
from genlight.models import char_tokenizer, tiny_llama
from genlight.models.logps import masked_nll

LR, CLIP, WARMUP_STEPS = 3e-4, 1.0, 1
ALPHABET = "abcdefghijklmnopqrstuvwxyz0123456789 "


def matmul_peak(n: int = 1536, reps: int = 5, dtype=torch.float32) -> float:
    """Measured matmul FLOP/s on this machine and thread count (median of reps)."""
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
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
    if "num_tokens" in batch:  # ours, packed into rows
        return int(batch["num_tokens"])
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


def ours(tok, rows, batch: int, steps: int, packing: bool, precision: str = "32-true") -> tuple[float, int]:
    module = SFTModule(net=lambda tokenizer: model(tokenizer), tokenizer=tok, lr=LR, warmup_steps=0, min_lr_ratio=1.0)
    clock = Clock()
    trainer = L.Trainer(accelerator="cpu", max_steps=WARMUP_STEPS + steps, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
                        num_sanity_val_steps=0, gradient_clip_val=CLIP, callbacks=[clock], precision=precision)
    trainer.fit(module, datamodule=datamodule(tok, rows, batch, packing))
    return clock.elapsed, clock.tokens


def trl(tok, rows, batch: int, steps: int, padding_free: bool, bf16: bool = False) -> tuple[float, int]:
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
                         logging_strategy="no", save_strategy="no", use_cpu=True, max_length=None if padding_free else 512,
                         padding_free=padding_free, dataloader_num_workers=0, optim="adamw_torch_fused", bf16=bf16)
        trainer = SFTTrainer(model=model(tok), args=args, train_dataset=Dataset.from_list(rows), processing_class=tok,
                             callbacks=[clock])
        counts, collate = [], trainer.data_collator

        def counting(features):  # the real tokens of each batch TRL builds
            b = collate(features)
            counts.append(real_tokens(b))
            return b

        trainer.data_collator = counting
        trainer.train()
    return clock.elapsed, sum(counts[WARMUP_STEPS: WARMUP_STEPS + steps])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--variants", default="bare,ours,ours_packed,trl,trl_pf,ours_packed_bf16,trl_bf16,trl_pf_bf16")
    args = ap.parse_args()
    torch.set_num_threads(2)
    tok = char_tokenizer()
    rows = make_rows(args.batch * (WARMUP_STEPS + args.steps) * 4)
    n_params = sum(p.numel() for p in model(tok).parameters())
    peak, peak_bf16 = matmul_peak(), matmul_peak(dtype=torch.bfloat16)
    print(f"CPU: {cpu_name()}; torch threads: {torch.get_num_threads()}; model: {n_params / 1e6:.1f} M params; "
          f"batch {args.batch}, rows 90-250 tokens; measured matmul peak fp32 {peak / 1e9:.1f} GFLOP/s, "
          f"bf16 {peak_bf16 / 1e9:.1f} GFLOP/s")
    runners = {
        "bare": lambda: bare(tok, rows, args.batch, args.steps),
        "ours": lambda: ours(tok, rows, args.batch, args.steps, packing=False),
        "ours_packed": lambda: ours(tok, rows, args.batch, args.steps, packing=True),
        "trl": lambda: trl(tok, rows, args.batch, args.steps, padding_free=False),
        "trl_pf": lambda: trl(tok, rows, args.batch, args.steps, padding_free=True),
        "ours_packed_bf16": lambda: ours(tok, rows, args.batch, args.steps, packing=True, precision="bf16-mixed"),
        "trl_bf16": lambda: trl(tok, rows, args.batch, args.steps, padding_free=False, bf16=True),
        "trl_pf_bf16": lambda: trl(tok, rows, args.batch, args.steps, padding_free=True, bf16=True),
    }
    names = args.variants.split(",")
    results: dict[str, list[float]] = {n: [] for n in names}
    for r in range(args.rounds):
        for name in names:  # alternating: every variant once per round
            elapsed, tokens = runners[name]()
            results[name].append(tokens / elapsed)
            print(f"round {r + 1} {name:12s} {tokens / elapsed:8.1f} real tokens/s", flush=True)
    print(f"\n{'variant':16s} {'tokens/s med':>12s} {'min-max':>17s} {'MFU':>6s}")
    med = {n: statistics.median(v) for n, v in results.items()}
    for n, v in results.items():
        p = peak_bf16 if n.endswith("bf16") else peak  # MFU against the peak of the variant's own precision
        print(f"{n:16s} {med[n]:12.1f} {min(v):8.1f}-{max(v):<8.1f} {6 * n_params * med[n] / p:6.1%}")
    for a, b in (("ours", "bare"), ("ours_packed", "bare"), ("ours", "trl"), ("ours_packed", "trl"), ("ours_packed", "trl_pf"),
                 ("ours_packed_bf16", "trl_bf16"), ("ours_packed_bf16", "trl_pf_bf16")):
        if a in med and b in med:
            print(f"{a} / {b}: {med[a] / med[b]:.2f}x")


if __name__ == "__main__":
    main()
