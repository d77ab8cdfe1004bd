"""The GPU check: SFT, DPO and RLVR (rollout=hf and rollout=vllm) a few steps each on a Qwen2 of Qwen2.5-0.5B's
shape (hidden 896, 24 layers, 14 heads, 2 KV heads, 151,936-row vocabulary, tied embeddings; random weights built
from a config), under trainer=gpu (one GPU, bf16-mixed) and trainer=fsdp (FSDP2 over every GPU), printing per GPU:
trained tokens/s, MFU against the GPU's dense bf16 peak, and peak GPU memory beside the lower bound (weights,
gradients and Adam's moments in float32, 16 B a parameter, sharded under FSDP2, plus 4 B a parameter for a frozen
reference). On a machine with nothing but this repository:

    make gpu-check            # a .venv-gpu with the CUDA build of torch and vLLM, then this script
    python bench/gpu_check.py [--only sft,dpo] [--peak-tflops 989]
    python bench/gpu_check.py --dry-run   # compose every run's config (any machine; no training)

It stops with an error on a machine without CUDA. Each run is its own process (FSDP2 relaunches it per GPU).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "bench")]

SHAPE_05B = dict(hidden_size=896, num_hidden_layers=24, num_attention_heads=14, num_key_value_heads=2, head_dim=64,
                 intermediate_size=4864)
# dense bf16 tensor-core peaks (TFLOP/s), by a substring of torch.cuda.get_device_name()
PEAKS = {"H200": 989, "H100 PCIe": 756, "H100": 989, "A100": 312, "L40S": 362, "L4": 121, "A10G": 125, "A10": 125,
         "RTX 4090": 165, "RTX 3090": 71}
STEPS = {"sft": 8, "dpo": 8, "rlvr": 3}


def runs(d: Path, gpus: int) -> dict[str, list[str]]:
    common = ["model=hf", f"model.pretrained={d / 'model'}", "test=false", "logger=none", "callbacks.hf_export=null",
              "callbacks.model_checkpoint=null", "trainer.num_sanity_val_steps=0", "+trainer.limit_val_batches=0",
              "optimized_metric=null", "trainer.enable_progress_bar=false", "extras.print_config=false",
              f"hydra.run.dir={d / 'runs'}"]
    algos = {
        "sft": ["algo=sft", "data=jsonl_sft", f"data.source.train={d / 'sft.jsonl'}", "data.batch_size=8",
                "data.max_length=512"],
        "dpo": ["algo=dpo", "data=jsonl_pref", f"data.source.train={d / 'pref.jsonl'}", "data.batch_size=8",
                "data.max_length=512", "algo.cache_ref_logps=false"],
        "rlvr_hf": ["algo=rlvr", "data=jsonl_prompts", f"data.source.train={d / 'prompts.jsonl'}", "data.batch_size=16",
                    "algo.num_generations=8", "algo.max_new_tokens=128", "algo.generation_lag=0",
                    "algo.micro_batch_size=32", "rollout.max_batch_size=128", "algo.log_completions_every_n_steps=0"],
    }
    algos["rlvr_vllm"] = [*algos["rlvr_hf"][:-2], "rollout=vllm", "rollout.enforce_eager=false",
                          "rollout.max_model_len=1024", "rollout.gpu_memory_utilization=0.3",
                          "algo.log_completions_every_n_steps=0"]
    out = {}
    for name, overrides in algos.items():
        steps = f"trainer.max_steps={STEPS[name.split('_')[0]]}"
        out[f"{name} trainer=gpu"] = [*common, *overrides, steps, "trainer=gpu"]
        if name != "rlvr_vllm":
            out[f"{name} trainer=fsdp x{gpus}"] = [*common, *overrides, steps, "trainer=fsdp", f"trainer.devices={gpus}"]
    return out


def one(overrides: list[str], peak_tflops: float | None) -> None:
    """Train one configuration in this process and print its figures as a JSON line (rank 0)."""
    import lightning as L
    import torch
    from hydra import compose, initialize_config_dir

    import genlight  # noqa: F401
    from genlight.pipeline import train
    from genlight.utils import register_resolvers

    sync = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)

    class Throughput(L.Callback):
        """Step time (after 1 warm-up step), tokens and FLOPs per step on this process."""

        def __init__(self):
            self.time = self.tokens = self.flops = 0.0

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            sync()
            self.t0 = time.perf_counter()

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            sync()
            if batch_idx == 0:
                return
            n = sum(p.numel() for p in pl_module.model.parameters())  # tied: the LM head's matmul counted once
            if "num_generations" in pl_module.hparams:  # RLVR: sampled (2N a token), then trained (6N)
                gen = float(trainer.callback_metrics["train/completion_length"]) * len(batch["prompts"]) * \
                    pl_module.hparams.num_generations
                prompt = float(batch["prompt_attention_mask"].sum())
                tokens, flops = prompt + gen, 2 * n * (prompt + gen) + 6 * n * (prompt + gen)
            else:  # SFT, DPO (each prompt once for its two completions): padded rows' real tokens, or packed rows
                if "completion_mask" in batch:
                    tokens = float(batch["prompt_attention_mask"].sum() + batch["completion_mask"].sum())
                elif "attention_mask" in batch:
                    tokens = float(batch["attention_mask"].sum())
                else:
                    tokens = float(batch["input_ids"].numel())
                flops = (8 if getattr(pl_module, "has_reference", False) else 6) * n * tokens  # + pi_ref's forward
            self.time += time.perf_counter() - self.t0
            self.tokens, self.flops = self.tokens + tokens, self.flops + flops

    register_resolvers()
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose("train", overrides=overrides, return_hydra_config=True)
    from hydra.core.hydra_config import HydraConfig

    HydraConfig().set_config(cfg)
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    meter = Throughput()
    _, objs = train(cfg, extra_callbacks=[meter])
    trainer, module = objs["trainer"], objs["module"]
    if not trainer.is_global_zero:
        return
    n = sum(p.numel() for p in module.model.parameters())  # a sharded DTensor counts its global size
    frozen = 4 * n if module.has_reference else 0
    bound = (16 * n + frozen) / trainer.world_size
    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    peak = peak_tflops or next((v for k, v in PEAKS.items() if k in gpu), None)
    print("RESULT " + json.dumps({
        "gpu": gpu, "world": trainer.world_size, "params": n,
        "tokens_per_s": meter.tokens / max(meter.time, 1e-9),
        "mfu": meter.flops / max(meter.time, 1e-9) / (peak * 1e12) if peak else None,
        "peak_gib": torch.cuda.max_memory_allocated() / 2**30 if gpu != "cpu" else None,
        "bound_gib": bound / 2**30}), flush=True)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--only", default="sft,dpo,rlvr_hf,rlvr_vllm")
    ap.add_argument("--peak-tflops", type=float, default=None)
    ap.add_argument("--dry-run", action="store_true", help="compose every run's config; no GPU needed")
    ap.add_argument("--one", nargs=argparse.REMAINDER, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.one is not None:
        return one(a.one, a.peak_tflops)
    if a.dry_run:
        from hydra import compose, initialize_config_dir

        import genlight  # noqa: F401
        from genlight.utils import register_resolvers

        register_resolvers()
        d = Path(tempfile.mkdtemp(prefix="gpu_check_"))
        with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
            for name, overrides in runs(d, 2).items():
                compose("train", overrides=overrides)
                print(f"composed: {name}")
        return
    import torch

    if not torch.cuda.is_available():
        sys.exit("gpu_check: no CUDA device here (torch.cuda.is_available() is False). Run it on a GPU machine "
                 "(`make gpu-check` installs the CUDA build of torch and vLLM first); --dry-run composes the configs.")
    from memory import build  # bench/memory.py: the real-vocabulary Qwen2, its tokenizer and the JSONL data

    gpus = torch.cuda.device_count()
    d = Path(tempfile.mkdtemp(prefix="gpu_check_"))
    build(d, SHAPE_05B)
    print(f"GPU: {torch.cuda.get_device_name()} x {gpus}; Qwen2 0.5B-shaped (random weights), vocabulary 151,936, "
          "bf16-mixed; per GPU, after 1 warm-up step")
    failed = []
    for name, overrides in runs(d, gpus).items():
        if not any(name.startswith(o) for o in a.only.split(",")):
            continue
        t0 = time.perf_counter()
        extra = ["--peak-tflops", str(a.peak_tflops)] if a.peak_tflops else []
        out = subprocess.run([sys.executable, __file__, *extra, "--one", *overrides], capture_output=True, text=True,
                             cwd=ROOT, env={**os.environ, "PROJECT_ROOT": str(ROOT), "HF_HUB_OFFLINE": "1"})
        res = [json.loads(ln[7:]) for ln in out.stdout.splitlines() if ln.startswith("RESULT ")]
        if out.returncode != 0 or not res:
            failed.append(name)
            print(f"{name}: FAILED (exit {out.returncode})\n{out.stderr[-3000:]}", flush=True)
            continue
        r = res[-1]
        mfu = f"{100 * r['mfu']:.1f}%" if r["mfu"] is not None else "? (--peak-tflops)"
        print(f"{name}: {r['tokens_per_s']:.0f} tokens/s/GPU, MFU {mfu}, peak {r['peak_gib']:.1f} GiB "
              f"(lower bound {r['bound_gib']:.1f} GiB), {time.perf_counter() - t0:.0f} s", flush=True)
    if failed:
        sys.exit(f"gpu_check: {len(failed)} run(s) failed: {', '.join(failed)}")


if __name__ == "__main__":
    main()
