"""The GPU check: ours and TRL on the same GPU, the same model directory, data and batch shapes, in one run.

SFT, DPO (the reference's forward every step) and RLVR (`rollout=hf`: 16 prompts x 8 samples x 128 new tokens a
step), then TRL 1.16's `SFTTrainer`, `DPOTrainer` and `GRPOTrainer` on the same work, alternating algorithm by
algorithm, on a Qwen2 of Qwen2.5-0.5B's shape (hidden 896, 24 layers, 14 heads, 2 KV heads, 151,936-row
vocabulary, tied embeddings; random weights built here from a config, data generated here: no network). Both
sides: float32 weights, bf16 autocast, no gradient checkpointing. Each run is its own process, timed the same way
from outside the training code: the wall time at the end of every optimizer step (CUDA synchronised; a Lightning
callback for ours, a `TrainerCallback` for TRL), the median of the intervals after the first step, and
`torch.cuda.max_memory_allocated` (reset at the process's start). The table prints TRL / ours per algorithm. About
6 minutes on one H100, start-up included. `rollout=vllm` is a row of ours when vLLM is importable.

On a bare CUDA image with no network (torch, transformers, lightning, peft, accelerate, pandas, pyarrow; no Hydra,
`datasets` or TRL), two steps:

    python3 bench/gpu_wheels.py        # on a machine with a network: the missing wheels -> gpu-wheels/ (~5 MB)
    python bench/gpu_check.py          # on the GPU machine, from the checkout (with gpu-wheels/ in it)

The second installs whatever the image lacks from gpu-wheels/ with `pip install --no-index --no-deps --target
gpu-wheels/site-pyX.Y` (this checkout included, built there offline), then runs. Before spending a GPU window:

    make gpu-sim                       # the same script on the CPU (--cpu: tiny model, a few steps) in .venv-gpusim
    python bench/gpu_check.py --dry-run   # compose our runs' configs (any machine; no training)
    python bench/gpu_check.py --only sft,dpo [--fsdp] [--wheels DIR]

Without CUDA (and without --cpu) it stops with an error before any work.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "bench")]
from gpu_wheels import BUILD, DEST, WHEELS  # noqa: E402  (bench/gpu_wheels.py: the pins)

SHAPE_05B = dict(hidden_size=896, num_hidden_layers=24, num_attention_heads=14, num_key_value_heads=2, head_dim=64,
                 intermediate_size=4864)
TINY = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
            intermediate_size=128)
ALGOS = ("sft", "dpo", "rlvr")
PEER = {"sft": "SFTTrainer", "dpo": "DPOTrainer", "rlvr": "GRPOTrainer"}


@dataclass(frozen=True)
class Setup:
    """The work: model shape, SFT / DPO rows (`batch` rows or pairs of `seq` tokens a step), RLVR (`prompts` x
    `samples` completions of `new_tokens`, trained in micro-batches of `micro`), optimizer steps per algorithm."""

    shape: dict
    seq: int
    batch: int
    prompts: int
    samples: int
    new_tokens: int
    micro: int
    steps: dict


GPU = Setup(SHAPE_05B, seq=512, batch=8, prompts=16, samples=8, new_tokens=128, micro=32,
            steps={"sft": 8, "dpo": 8, "rlvr": 3})
# the CPU simulation: the same code paths at a size two CPU cores train in seconds
CPU = Setup(TINY, seq=64, batch=4, prompts=4, samples=4, new_tokens=16, micro=8, steps={"sft": 3, "dpo": 3, "rlvr": 2})


# ---------------------------------------------------------------------------------------------- offline install
def _find(module: str):
    try:
        return importlib.util.find_spec(module)
    except ModuleNotFoundError:  # a dotted name whose parent is missing
        return None


def install_offline(wheels: Path, target: Path, reqs: dict[str, str] = WHEELS, project: bool = True) -> list[str]:
    """Install into `target`, from the folder `wheels` with no index and no dependency resolution, each requirement
    of `reqs` (requirement -> module) whose module this Python cannot import, and (`project`) this checkout unless
    genlight is importable; `target` then goes first on this process's path and its children's (PYTHONPATH). An
    environment that lacks nothing is left as it is. Returns what it installed (what an earlier call put in `target`
    is not installed again, except the checkout, rebuilt each time from its current files). A requirement with no
    wheel in the folder stops with an error naming both."""
    lacking_env = [r for r, module in reqs.items() if _find(module) is None]
    build_project = project and _find("genlight") is None
    if not lacking_env and not build_project:
        return []
    target = target.resolve()
    if str(target) not in sys.path:
        sys.path.insert(0, str(target))
    paths = [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
    if str(target) not in paths:
        os.environ["PYTHONPATH"] = os.pathsep.join([str(target), *paths])
    importlib.invalidate_caches()
    todo = [r for r in lacking_env if _find(reqs[r]) is None]  # not in `target` from an earlier run either
    if not todo and not build_project:
        return []
    have = [w.name.lower() for w in wheels.glob("*.whl")] if wheels.is_dir() else []
    needed = todo + ([BUILD.split("==")[0]] if build_project else [])  # the build takes any setuptools >= 68
    lacking = [r for r in needed if not any(h.startswith(r.lower().replace("-", "_").replace("==", "-") + "-")
                                            for h in have)]  # name-version- (or name-, unpinned)
    if lacking:
        sys.exit(f"gpu_check: {', '.join(r for r in todo if r in lacking) or 'the project build'} not installed, "
                 f"and {wheels} has no wheel for {', '.join(lacking)}: run `python3 bench/gpu_wheels.py` on a machine "
                 "with a network and bring the folder along (--wheels DIR names another)")
    target.mkdir(parents=True, exist_ok=True)
    pip = [sys.executable, "-m", "pip", "install", "--no-index", "--find-links", str(wheels), "--no-deps",
           "--target", str(target), "--upgrade", "--disable-pip-version-check", "--quiet"]
    env = {**os.environ, "PIP_CONFIG_FILE": os.devnull, "PIP_NO_INPUT": "1"}  # the folder and nothing else

    def run(what: list[str]) -> None:
        if subprocess.run([*pip, *what], env=env).returncode != 0:
            py = f"{sys.version_info.major}.{sys.version_info.minor}"
            sys.exit(f"gpu_check: pip could not install {' '.join(what)} from {wheels} into {target} (above: why). A "
                     f"wheel for another Python? This is Python {py}: `python3 bench/gpu_wheels.py --python-version "
                     f"{py}` on a machine with a network")

    if todo:
        print(f"installing from {wheels} into {target}: {' '.join(todo)}", flush=True)
        run(todo)
    if build_project:  # from a copy, so that no build/ or *.egg-info lands in the checkout
        print(f"installing this checkout ({ROOT}) into {target}", flush=True)
        with tempfile.TemporaryDirectory() as tmp:
            for f in ("pyproject.toml", "README.md"):
                shutil.copy(ROOT / f, tmp)
            for folder in ("src", "conf"):
                shutil.copytree(ROOT / folder, Path(tmp) / folder, ignore=shutil.ignore_patterns("__pycache__"))
            run([tmp])
    importlib.invalidate_caches()
    return todo + (["genlight"] if build_project else [])


# ---------------------------------------------------------------------------------------------- measuring
class StepClock:
    """The wall time at the end of each optimizer step, read after `torch.cuda.synchronize()` (on CUDA)."""

    def __init__(self):
        import torch

        self.sync = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)
        self.ends: list[float] = []

    def tick(self) -> None:
        self.sync()
        self.ends.append(time.perf_counter())

    def result(self, run: str) -> dict:
        import resource

        import torch

        gaps = [b - a for a, b in zip(self.ends, self.ends[1:])]
        cuda = torch.cuda.is_available()
        peak = torch.cuda.max_memory_allocated() if cuda else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        return {"run": run, "steps": len(self.ends), "step_s": statistics.median(gaps) if gaps else None,
                "min_s": min(gaps, default=None), "max_s": max(gaps, default=None), "peak_gib": peak / 2**30,
                "memory": "max_memory_allocated" if cuda else "peak RSS"}


def _start_memory() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()


# ---------------------------------------------------------------------------------------------- the work
def write_data(d: Path, s: Setup) -> None:
    """The JSONL files both sides train on: SFT rows and preference pairs of `s.seq` tokens with the character
    tokenizer (<s> + prompt + completion + </s>), and addition prompts with their answers."""
    import random

    rng = random.Random(0)
    text = lambda n: "".join(rng.choice("abcdefghij klmnop") for _ in range(n))  # noqa: E731
    p = max(s.seq // 16, 2)
    c = s.seq - p - 2
    rows = {
        "sft.jsonl": [{"prompt": text(p), "completion": text(c)} for _ in range(64)],
        "pref.jsonl": [{"prompt": text(p), "chosen": text(c), "rejected": text(c)} for _ in range(64)],
        "prompts.jsonl": [{"prompt": f"{a}+{b}=", "answer": str(a + b)}
                          for a, b in ((rng.randrange(100), rng.randrange(100)) for _ in range(256))],
    }
    for name, rs in rows.items():
        (d / name).write_text("".join(json.dumps(r) + "\n" for r in rs))


def ours_runs(d: Path, s: Setup, cpu: bool = False, gpus: int = 1, vllm: bool = False,
              fsdp: bool = False) -> dict[str, list[str]]:
    """Our runs' Hydra overrides by name (`sft trainer=gpu`, ...; the algorithm before any `_`): SFT, DPO, RLVR
    with `rollout=hf`, and optionally RLVR with `rollout=vllm` and FSDP2 rows over `gpus` GPUs."""
    common = ["model=hf", f"model.pretrained={d / 'model'}", "test=false", "logger=none", "callbacks.hf_export=null",
              "callbacks.model_checkpoint=null", "trainer.num_sanity_val_steps=0", "+trainer.limit_val_batches=0",
              "optimized_metric=null", "trainer.enable_progress_bar=false", "trainer.enable_model_summary=false",
              "extras.print_config=false", "model.gradient_checkpointing=false", f"hydra.run.dir={d / 'runs'}"]
    rlvr = ["algo=rlvr", "data=jsonl_prompts", f"data.source.train={d / 'prompts.jsonl'}",
            f"data.batch_size={s.prompts}", f"algo.num_generations={s.samples}", f"algo.max_new_tokens={s.new_tokens}",
            "algo.generation_lag=0", f"algo.micro_batch_size={s.micro}", "reward=exact",
            # as TRL's GRPO: every group in the loss (a random policy's groups all score 0), no prompt retired
            "algo.zero_variance_filter=false", "algo.retire_threshold=null", "algo.log_completions_every_n_steps=0"]
    algos = {
        "sft": ["algo=sft", "data=jsonl_sft", f"data.source.train={d / 'sft.jsonl'}", f"data.batch_size={s.batch}",
                f"data.max_length={s.seq}"],
        "dpo": ["algo=dpo", "data=jsonl_pref", f"data.source.train={d / 'pref.jsonl'}", f"data.batch_size={s.batch}",
                f"data.max_length={s.seq}", "algo.cache_ref_logps=false"],
        "rlvr_hf": [*rlvr, f"rollout.max_batch_size={s.prompts * s.samples}"],
    }
    trainer = "trainer=cpu" if cpu else "trainer=gpu"
    steps = lambda name: f"trainer.max_steps={s.steps[algo_of(name)]}"  # noqa: E731
    out = {f"{name} {trainer}": [*common, *overrides, steps(name), trainer] for name, overrides in algos.items()}
    if vllm:
        out["rlvr_vllm trainer=gpu"] = [*common, *rlvr, "rollout=vllm", "rollout.enforce_eager=false",
                                        "rollout.max_model_len=1024", "rollout.gpu_memory_utilization=0.3",
                                        steps("rlvr"), trainer]
    if fsdp:
        for name, overrides in algos.items():
            out[f"{name} trainer=fsdp x{gpus}"] = [*common, *overrides, steps(name), "trainer=fsdp",
                                                   f"trainer.devices={gpus}"]
    return out


def algo_of(run: str) -> str:
    """`rlvr_vllm trainer=gpu` -> `rlvr`."""
    return run.split()[0].split("_")[0]


def one(name: str, overrides: list[str]) -> None:
    """Train one of our configurations in this process; print its steps' timing and peak memory (rank 0)."""
    _start_memory()
    import lightning as L
    from hydra import compose, initialize_config_dir
    from hydra.core.hydra_config import HydraConfig

    from genlight.pipeline import train
    from genlight.utils import register_resolvers

    clock = StepClock()

    class Clock(L.Callback):
        """A tick when an optimizer step has ended (manual optimization included: RLVR's micro-batched step)."""

        step = 0

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            if trainer.global_step > self.step:
                self.step = trainer.global_step
                clock.tick()

    register_resolvers()
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose("train", overrides=overrides, return_hydra_config=True)
    HydraConfig().set_config(cfg)
    _, objs = train(cfg, extra_callbacks=[Clock()])
    if objs["trainer"].is_global_zero:
        print("RESULT " + json.dumps(clock.result(name)), flush=True)


def peer(name: str, d: Path, algo: str, s: Setup) -> None:
    """TRL's trainer for `algo` on the same model directory, data and batch shapes; the same timing."""
    _start_memory()
    import datasets
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback

    clock = StepClock()

    class Clock(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            clock.tick()

    cuda = torch.cuda.is_available()
    model = AutoModelForCausalLM.from_pretrained(d / "model", dtype=torch.float32, local_files_only=True)
    tok = AutoTokenizer.from_pretrained(d / "model", local_files_only=True)
    common = dict(output_dir=str(d / "trl" / algo), max_steps=s.steps[algo], report_to="none", save_strategy="no",
                  bf16=cuda, fp16=False, use_cpu=not cuda, gradient_checkpointing=False, disable_tqdm=True,
                  dataloader_num_workers=0, logging_steps=10**6, seed=42)
    data = lambda f: datasets.load_dataset("json", data_files=str(d / f), split="train")  # noqa: E731
    if algo == "sft":
        from trl import SFTConfig, SFTTrainer

        args = SFTConfig(**common, per_device_train_batch_size=s.batch, max_length=s.seq, completion_only_loss=True)
        trainer = SFTTrainer(model=model, args=args, train_dataset=data("sft.jsonl"), processing_class=tok)
    elif algo == "dpo":
        from trl import DPOConfig, DPOTrainer

        args = DPOConfig(**common, per_device_train_batch_size=s.batch, max_length=s.seq, precompute_ref_log_probs=False)
        trainer = DPOTrainer(model=model, args=args, train_dataset=data("pref.jsonl"), processing_class=tok)
    else:
        from trl import GRPOConfig, GRPOTrainer

        from genlight.rewards import ExactAnswer  # our reward=exact: the same verifier on both sides

        verify = ExactAnswer()

        def exact_answer(prompts, completions, answer, **kwargs):
            return [verify(c, a) for c, a in zip(completions, answer)]

        # one optimizer step = `prompts` x `samples` completions, generated at once, trained in micro-batches
        args = GRPOConfig(**common, per_device_train_batch_size=s.micro,
                          gradient_accumulation_steps=s.prompts * s.samples // s.micro, num_generations=s.samples,
                          max_completion_length=s.new_tokens, temperature=1.0, top_p=1.0, beta=0.0, loss_type="cispo",
                          epsilon_high=5.0, scale_rewards="batch")
        trainer = GRPOTrainer(model=model, reward_funcs=exact_answer, args=args, train_dataset=data("prompts.jsonl"),
                              processing_class=tok)
    trainer.add_callback(Clock())
    trainer.train()
    print("RESULT " + json.dumps(clock.result(name)), flush=True)


def describe(s: Setup, algo: str) -> str:
    if algo == "rlvr":
        return f"RLVR, {s.prompts} prompts x {s.samples} samples x {s.new_tokens} new tokens"
    return f"{algo.upper()}, {s.batch} {'pairs' if algo == 'dpo' else 'rows'} x {s.seq} tokens" + \
        (", reference every step" if algo == "dpo" else "")


def fmt(r: dict | None, key: str, digits: int = 3) -> str:
    return "FAILED" if r is None or r.get(key) is None else f"{r[key]:.{digits}f}"


def ratio(a: dict | None, b: dict | None, key: str) -> str:
    return f"**{a[key] / b[key]:.2f}x**" if a and b and a.get(key) and b.get(key) else ""


def main() -> None:
    ap = argparse.ArgumentParser(description="ours against TRL on one GPU (bench/gpu_check.py's docstring)")
    ap.add_argument("--only", default=",".join(ALGOS), help="algorithms, of sft,dpo,rlvr")
    ap.add_argument("--cpu", action="store_true", help="simulate on the CPU: tiny model, a few steps")
    ap.add_argument("--fsdp", action="store_true", help="also our FSDP2 rows over every GPU")
    ap.add_argument("--wheels", type=Path, default=DEST, help="the folder bench/gpu_wheels.py filled")
    ap.add_argument("--run-timeout", type=float, default=240, help="seconds one run may take")
    ap.add_argument("--dry-run", action="store_true", help="compose every run's config; no GPU needed")
    ap.add_argument("--one", nargs=argparse.REMAINDER, help=argparse.SUPPRESS)
    ap.add_argument("--peer", nargs=3, help=argparse.SUPPRESS)
    a = ap.parse_args()
    s = CPU if a.cpu else GPU
    if a.one is not None:
        return one(a.one[0], a.one[1:])
    if a.peer is not None:
        return peer(a.peer[0], Path(a.peer[1]), a.peer[2], s)
    only = a.only.split(",")
    if unknown := [o for o in only if o not in ALGOS]:
        sys.exit(f"gpu_check: --only {','.join(unknown)}: not one of {','.join(ALGOS)}")
    import torch

    if not (a.cpu or a.dry_run or torch.cuda.is_available()):
        sys.exit("gpu_check: no CUDA device here (torch.cuda.is_available() is False). Run it on a GPU machine; "
                 "--cpu simulates it on the CPU, --dry-run composes the configs.")
    t_start = time.perf_counter()
    target = a.wheels / f"site-py{sys.version_info.major}.{sys.version_info.minor}"
    installed = install_offline(a.wheels, target)
    if installed:
        print(f"installed offline: {', '.join(installed)} ({time.perf_counter() - t_start:.0f} s)", flush=True)
    if a.dry_run:
        from hydra import compose, initialize_config_dir

        from genlight.utils import register_resolvers

        register_resolvers()
        d = Path(tempfile.mkdtemp(prefix="gpu_check_"))
        with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
            for name, overrides in ours_runs(d, GPU, gpus=2, vllm=True, fsdp=True).items():
                compose("train", overrides=overrides)
                print(f"composed: {name}")
        return

    import transformers
    from memory import build  # bench/memory.py: the real-vocabulary Qwen2 and its tokenizer

    gpus = torch.cuda.device_count()
    d = Path(tempfile.mkdtemp(prefix="gpu_check_"))
    build(d, s.shape)
    write_data(d, s)
    with torch.device("meta"):
        n = sum(p.numel() for p in transformers.AutoModelForCausalLM.from_config(
            transformers.AutoConfig.from_pretrained(d / "model")).parameters())
    from importlib.metadata import version

    device = f"{torch.cuda.get_device_name()} x {gpus}" if not a.cpu else "CPU (simulation, --cpu)"
    print(f"{device}; {time.strftime('%Y-%m-%d')}; torch {torch.__version__}, transformers {transformers.__version__}, "
          f"lightning {version('lightning')}, TRL {version('trl')}; Qwen2 {n / 1e6:.1f} M parameters (random weights), "
          f"vocabulary 151,936, {'fp32' if a.cpu else 'fp32 weights + bf16 autocast'}, no gradient checkpointing; "
          f"model built in {time.perf_counter() - t_start:.0f} s", flush=True)

    vllm = not a.cpu and _find("vllm") is not None
    ours = ours_runs(d, s, a.cpu, gpus, vllm, a.fsdp and gpus > 1)
    env = {**os.environ, "PROJECT_ROOT": str(ROOT), "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
           "HF_DATASETS_CACHE": str(d / "datasets-cache"), "TOKENIZERS_PARALLELISM": "false", "WANDB_MODE": "disabled"}
    cpu = ["--cpu"] if a.cpu else []
    # ours and TRL on the same, single GPU (a TRL Trainer that sees several wraps the model in DataParallel)
    first_gpu = {} if a.cpu else {"CUDA_VISIBLE_DEVICES": os.environ.get("CUDA_VISIBLE_DEVICES", "0").split(",")[0]}
    results: dict[str, dict | None] = {}
    for algo in ALGOS:
        if algo not in only:
            continue
        runs = {k: [*cpu, "--one", k, *v] for k, v in ours.items() if algo_of(k) == algo}
        runs[f"{algo} TRL"] = [*cpu, "--peer", f"{algo} TRL", str(d), algo]
        for name, argv in runs.items():
            t0 = time.perf_counter()
            try:
                out = subprocess.run([sys.executable, __file__, *argv], capture_output=True, text=True, cwd=ROOT,
                                     env=env if "fsdp" in name else {**env, **first_gpu}, timeout=a.run_timeout)
                rc, stdout, stderr = out.returncode, out.stdout, out.stderr
            except subprocess.TimeoutExpired as e:  # its output may come back as bytes
                text = lambda x: x.decode(errors="replace") if isinstance(x, bytes) else (x or "")  # noqa: E731
                rc, stdout, stderr = f"timeout after {a.run_timeout:.0f} s", text(e.stdout), text(e.stderr)
            res = [json.loads(ln[7:]) for ln in stdout.splitlines() if ln.startswith("RESULT ")]
            want = s.steps[algo]
            if rc != 0 or not res or res[-1]["steps"] != want:
                done = f", {res[-1]['steps']} of {want} steps" if res else ""
                print(f"{name}: FAILED (exit {rc}{done})\n{stderr[-3000:]}", flush=True)
                results[name] = None
                continue
            r = results[name] = res[-1]
            print(f"{name}: {r['step_s']:.3f} s/step (median of {r['steps'] - 1}, {r['min_s']:.3f}-{r['max_s']:.3f}), "
                  f"peak {r['peak_gib']:.2f} GiB ({r['memory']}), {time.perf_counter() - t0:.0f} s", flush=True)

    mem = "peak RSS GiB" if a.cpu else "peak GiB"
    print(f"\n| {device} | ours s/step | TRL s/step | TRL / ours | ours {mem} | TRL {mem} | TRL / ours |")
    print("|---|---|---|---|---|---|---|")
    for algo in ALGOS:
        if algo not in only:
            continue
        trl = results.get(f"{algo} TRL")
        for i, name in enumerate(k for k in results if algo_of(k) == algo and k != f"{algo} TRL"):
            o = results[name]  # the first: the single-device run TRL is compared with
            label = describe(s, algo) + ("" if i == 0 else f" (ours: {name})")
            peer_col = f"TRL `{PEER[algo]}` {fmt(trl, 'step_s')}" if i == 0 else ""
            print(f"| {label} | {fmt(o, 'step_s')} | {peer_col} | {ratio(trl, o, 'step_s') if peer_col else ''} "
                  f"| {fmt(o, 'peak_gib', 2)} | {fmt(trl, 'peak_gib', 2) if peer_col else ''} "
                  f"| {ratio(trl, o, 'peak_gib') if peer_col else ''} |")
    print(f"\ns/step: median wall time between optimizer-step ends after the first step; {mem.split(' GiB')[0]}: "
          f"whole process. Total {time.perf_counter() - t_start:.0f} s.")
    failed = [k for k, v in results.items() if v is None]
    if failed:
        sys.exit(f"gpu_check: {len(failed)} run(s) failed: {', '.join(failed)}")


if __name__ == "__main__":
    main()
