"""DPO benchmark: our DPOModule (Lightning) against TRL's DPOTrainer on identical work.

    OMP_WAIT_POLICY=PASSIVE python bench/dpo_speed.py [--steps 40] [--rounds 3]
    OMP_WAIT_POLICY=PASSIVE python bench/dpo_speed.py --size 30m --steps 6 --pairs 8   # compute-bound

`--size 30m`: a 33.6 M-parameter Llama (hidden 512, 8 layers) on random variable-length pairs (prompt
40-120 tokens, chosen and rejected 50-130 each, so prompt + completion 90-250), max length 512: a step is
matmul work, not Python overhead.

Identical work: the default tiny Llama (same seed), the arithmetic preference pairs, 64 pairs per
step, max length 16, beta 0.1, fp32, AdamW at the same lr, grad-norm clip 1.0, 2 CPU threads, no
logging and no progress bars. Each run trains `--steps` steps over a dataset of `--steps / 2`
batches (two epochs), timed from the data preparation (tokenization; TRL 1.16 also precomputes the
reference log-probs there, when the trainer is built) to the end of training. Modes: frozen reference computed every step (ours: cache off; TRL: deep-copied
`ref_model`), and reference log-probs computed once (ours: the cache; TRL:
`precompute_ref_log_probs=True`). Ours runs each mode padded (each prompt encoded once for its pair, KV
cache shared) and with `data.packing=true` (each pair one padding-free prompt tree, rows balanced up to the max
length; TRL 1.16 has no DPO padding-free mode: its `padding_free` falls back to padding). Also: the fraction of this CPU's measured fp32 matmul throughput
our step reaches (6 P tokens policy FLOPs + 2 P tokens for a reference forward).
TRL is an optional bench dependency: pip install -e ".[bench]".
"""

from __future__ import annotations

import argparse
import copy
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

import lightning as L
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from machine import cpu_name  # noqa: E402  (bench/machine.py)

from genlight.datamodules.arithmetic import ArithmeticTask  # noqa: E402
from genlight.datamodules.lm import LMDataModule  # noqa: E402
from genlight.lightning_modules.dpo import DPOModule  # noqa: E402
from genlight.models import char_tokenizer, tiny_llama  # noqa: E402

PAIRS, MAX_LEN, BETA, LR = 64, 16, 0.1, 2e-4
SIZES = {"tiny": {}, "30m": {"hidden_size": 512, "num_layers": 8, "num_heads": 8, "intermediate_size": 2048,
                            "max_position_embeddings": 512}}
SIZE = SIZES["tiny"]


def net(tok):
    return tiny_llama(tok, seed=0, **SIZE)


class Rows:
    """A fixed list of preference rows as a data source."""

    def __init__(self, rows):
        self._rows = rows

    def rows(self, split):
        return self._rows


def data(steps: int):
    n = PAIRS * max(steps // 2, 1)
    if SIZE:  # compute-bound: random variable-length text pairs
        rng, abc = random.Random(0), "abcdefghijklmnopqrstuvwxyz0123456789 "
        text = lambda lo, hi: "".join(rng.choices(abc, k=rng.randint(lo, hi)))  # noqa: E731
        return [{"prompt": text(40, 120), "chosen": text(50, 130), "rejected": text(50, 130)} for _ in range(n)]
    task = ArithmeticTask(n_train=n, n_val=16, n_test=16, seed=0)
    return [r for _, r in task.preference_rows("train")]


def ours(rows, steps: int, cache: bool, packing: bool = False) -> tuple[float, float]:
    tok = char_tokenizer()
    t0 = time.perf_counter()
    dm = LMDataModule(Rows([(f"row {i}", r) for i, r in enumerate(rows)]), tok, kind="preference",
                      batch_size=PAIRS, max_length=MAX_LEN, packing=packing)
    dm.setup()
    module = DPOModule(net=lambda tokenizer: net(tokenizer), tokenizer=tok, beta=BETA, lr=LR,
                       weight_decay=0.0, warmup_steps=0, min_lr_ratio=1.0, cache_ref_logps=cache)
    trainer = L.Trainer(accelerator="cpu", max_steps=steps, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
                        num_sanity_val_steps=0, gradient_clip_val=1.0)
    ex = dm.examples["train"]
    tokens = sum(len(e["prompt_ids"]) * 2 + len(e["chosen_ids"]) + len(e["rejected_ids"]) for e in ex)
    once = sum(len(e["prompt_ids"]) + len(e["chosen_ids"]) + len(e["rejected_ids"]) for e in ex)
    trainer.fit(module, datamodule=dm)
    return steps / (time.perf_counter() - t0), tokens / (steps // 2), once / (steps // 2)


def trl(rows, steps: int, precompute: bool) -> float:
    import datasets
    from trl import DPOConfig, DPOTrainer

    tok = char_tokenizer()
    model = net(tok)
    ds = datasets.Dataset.from_list([{k: r[k] for k in ("prompt", "chosen", "rejected")} for r in rows])
    args = DPOConfig(
        output_dir=tempfile.mkdtemp(), per_device_train_batch_size=PAIRS, max_steps=steps, learning_rate=LR,
        lr_scheduler_type="constant", warmup_steps=0, weight_decay=0.0, beta=BETA, max_length=MAX_LEN,
        bf16=False, fp16=False, use_cpu=True, gradient_checkpointing=False,
        precompute_ref_log_probs=precompute, report_to="none", logging_steps=10_000, save_strategy="no",
        disable_tqdm=True, dataloader_num_workers=0, max_grad_norm=1.0, seed=0,
    )
    ref = copy.deepcopy(model)
    t0 = time.perf_counter()  # TRL 1.16 tokenizes and precomputes the reference log-probs when the trainer is built
    trainer = DPOTrainer(model=model, ref_model=ref, args=args, train_dataset=ds, processing_class=tok)
    trainer.train()
    return steps / (time.perf_counter() - t0)


def matmul_flops(n: int = 1024, reps: int = 20) -> float:
    a, b = torch.randn(n, n), torch.randn(n, n)
    for _ in range(3):
        a @ b
    t0 = time.perf_counter()
    for _ in range(reps):
        a @ b
    return 2 * n**3 * reps / (time.perf_counter() - t0)


def main() -> None:
    global SIZE, PAIRS, MAX_LEN
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--size", choices=list(SIZES), default="tiny")
    ap.add_argument("--pairs", type=int, default=PAIRS)
    args = ap.parse_args()
    SIZE, PAIRS = SIZES[args.size], args.pairs
    MAX_LEN = 512 if SIZE else MAX_LEN
    torch.set_num_threads(args.threads)
    cpu = cpu_name()
    print(f"CPU: {cpu}; torch threads: {torch.get_num_threads()}; size {args.size}; {PAIRS} pairs/step")
    rows = data(args.steps)
    res = {k: [] for k in ("ours_ref", "ours_ref_packed", "trl_ref", "ours_cached", "ours_cached_packed", "trl_precompute")}
    tokens_per_step = once_per_step = 0.0
    for r in range(args.rounds):  # alternate ours and TRL so background load hits both alike
        sps, tokens_per_step, once_per_step = ours(rows, args.steps, cache=False)
        res["ours_ref"].append(sps)
        res["ours_ref_packed"].append(ours(rows, args.steps, cache=False, packing=True)[0])
        res["trl_ref"].append(trl(rows, args.steps, precompute=False))
        res["ours_cached"].append(ours(rows, args.steps, cache=True)[0])
        res["ours_cached_packed"].append(ours(rows, args.steps, cache=True, packing=True)[0])
        res["trl_precompute"].append(trl(rows, args.steps, precompute=True))
        print(f"round {r}: " + ", ".join(f"{k} {v[-1]:.3f} steps/s" for k, v in res.items()), flush=True)
    med = {k: statistics.median(v) for k, v in res.items()}
    for k, v in res.items():
        print(f"  {k}: median {med[k]:.3f} steps/s (min-max {min(v):.3f}-{max(v):.3f})")
    print(f"\nsteps/s (median of {args.rounds}; {args.steps} steps; {PAIRS} pairs/step; {args.threads} threads)")
    def line(name, a, b):
        print(f"  {name}: ours {med[a]:.3f}  TRL {med[b]:.3f}  ratio {med[a] / med[b]:.2f}x "
              f"(per-round ratios {min(x / y for x, y in zip(res[a], res[b])):.2f}-{max(x / y for x, y in zip(res[a], res[b])):.2f})")

    line("frozen reference every step, padded", "ours_ref", "trl_ref")
    line("frozen reference every step, data.packing=true", "ours_ref_packed", "trl_ref")
    line("reference once (cache / precompute), padded", "ours_cached", "trl_precompute")
    line("reference once (cache / precompute), data.packing=true", "ours_cached_packed", "trl_precompute")
    line("our default (cached, padded) vs TRL frozen ref_model", "ours_cached", "trl_ref")
    params = sum(p.numel() for p in net(char_tokenizer()).parameters())
    peak = statistics.median(matmul_flops() for _ in range(3))
    print(f"  CPU fp32 matmul (1024^3): {peak / 1e9:.1f} GFLOP/s; model FLOPs reached, {params / 1e6:.2f} M params, "
          f"6 P per trained token + 2 P per reference token (in the cached modes the reference runs in half the steps), "
          f"counting each pair's tokens as TRL computes them ({tokens_per_step:.0f}/step: the prompt twice) and as "
          f"real tokens ({once_per_step:.0f}/step: the prompt once):")
    for key, ref in (("ours_ref", 2), ("ours_ref_packed", 2), ("ours_cached", 1), ("ours_cached_packed", 1)):
        f2, f1 = ((6 + ref) * params * t * med[key] for t in (tokens_per_step, once_per_step))
        print(f"    {key}: {f2 / 1e9:.1f} GFLOP/s ({100 * f2 / peak:.1f}%); real tokens {f1 / 1e9:.1f} GFLOP/s "
              f"({100 * f1 / peak:.1f}%)")


if __name__ == "__main__":
    main()
