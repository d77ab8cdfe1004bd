"""Peak memory (RSS) of SFT with LoRA against full fine-tuning, at a size where weights and optimizer state
dominate: a 33.6 M-parameter Llama (hidden 512, 8 layers), `python train.py algo=sft` for a few steps.

    OMP_WAIT_POLICY=PASSIVE python bench/lora_memory.py [--rounds 3] [--steps 10]

Each run is its own `train.py` process (so its peak RSS is its own: ru_maxrss of the finished child), the two
modes alternating in every round; the same data, batch `--batch` (8: the regime LoRA is for, where weights,
gradients and Adam state outweigh activations; at batch 128 activations dominate and LoRA saves nothing),
fp32, no logger, no export. A bare process that
only imports the stack is measured too, so the training's own share can be read off. Median and min-max.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
from pathlib import Path

from machine import cpu_name  # bench/machine.py

ROOT = Path(__file__).resolve().parents[1]
SIZE = ["model.net.hidden_size=512", "model.net.num_layers=8", "model.net.num_heads=8",
        "model.net.intermediate_size=2048"]


def peak_rss_mb(args: list[str]) -> float:
    """Run a child Python and return its peak resident set size in MB (Linux: ru_maxrss is in KiB)."""
    code = ("import resource, runpy, sys; sys.argv = sys.argv[1:]; "
            "runpy.run_path(sys.argv[0], run_name='__main__') if sys.argv[0] != '-' else __import__('train'); "
            "print('RSS', resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)")
    env = {**os.environ, "PROJECT_ROOT": str(ROOT), "WANDB_MODE": "offline"}
    out = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, cwd=ROOT, env=env)
    if out.returncode != 0:
        sys.exit(out.stderr[-3000:])
    line = [ln for ln in out.stdout.splitlines() if ln.startswith("RSS ")][-1]
    return int(line.split()[1]) / 1024


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--batch", type=int, default=8)
    a = ap.parse_args()
    cpu = cpu_name()
    print(f"CPU: {cpu}, {os.cpu_count()} cores; peak RSS of one train.py process per run")
    base = ["train.py", "algo=sft", *SIZE, f"trainer.max_steps={a.steps}", f"trainer.val_check_interval={a.steps}",
            "test=false", "logger=none", "callbacks.hf_export=null", "trainer.enable_progress_bar=false",
            "extras.print_config=false", "data.source.n_val=16", f"data.batch_size={a.batch}",
            "data.eval_batch_size=16", "hydra.run.dir=/tmp/lora_memory_bench"]
    modes = {"imports only": ["-"], "full fine-tuning": base, "LoRA r=16 (all-linear)": [*base, "model.lora.r=16"]}
    res = {k: [] for k in modes}
    for r in range(a.rounds):
        for name, args in modes.items():
            res[name].append(peak_rss_mb(args))
        print(f"round {r}: " + ", ".join(f"{k} {v[-1]:.0f} MB" for k, v in res.items()), flush=True)
    med = {k: statistics.median(v) for k, v in res.items()}
    print(f"\nmedian (min-max) of {a.rounds} rounds, 33.6 M params, batch {a.batch}, fp32, {a.steps} steps")
    for k, v in res.items():
        extra = f", {med[k] - med['imports only']:.0f} MB above the imports" if k != "imports only" else ""
        print(f"  {k}: {med[k]:.0f} MB ({min(v):.0f}-{max(v):.0f}){extra}")
    full, lora = (med[k] - med["imports only"] for k in list(modes)[1:])
    print(f"  LoRA / full, above the imports: {lora / full:.2f}")


if __name__ == "__main__":
    main()
