"""The learning table of RLVR runs (logger=csv) as Markdown: the warm start, held-out pass@1 before and after RL,
the test of the best checkpoint, and each run's wall-clock time.

    python train.py -m experiment=rg_arithmetic,rg_spell_backward seed=0,1,2 logger=csv
    python scripts/rl_table.py logs/train/multiruns/<date>        # or run directories, one or more
    python scripts/rl_table.py <multirun> --by algo.advantage     # a column of that config key (the rows' setting)

Before RL is `scalerl/R0`, the validation over the whole val split that runs before the first step (logged once the
ScaleRL fit has its points); after is the last validation (at the last step); test is the checkpoint with the
best val pass@1 on the test split. Wall-clock: from the run's config to its last metric written (the warm start,
every validation and the test included; the ~6 s of imports not).
"""

from __future__ import annotations

import argparse
import csv
from pathlib import Path

from omegaconf import OmegaConf


def last(rows: list[dict], key: str, before_step: int | None = None) -> float | None:
    values = [(int(r["step"]), float(r[key])) for r in rows if r.get(key)]
    if before_step is not None:
        values = [v for v in values if v[0] < before_step]
    return values[-1][1] if values else None


def summary(run: Path, by: str | None = None) -> dict:
    metrics = sorted(run.glob("csv/version_*/metrics.csv"))
    if not metrics:
        raise SystemExit(f"{run}: no csv/version_*/metrics.csv (train with logger=csv)")
    rows = list(csv.DictReader(metrics[-1].open()))
    cfg = OmegaConf.load(run / ".hydra" / "config.yaml")
    tasks = [t if isinstance(t, str) else t["name"] for t in (cfg.data.source.get("tasks") or [])]
    test_step = min((int(r["step"]) for r in rows if r.get("test/pass@1")), default=None)
    seconds = metrics[-1].stat().st_mtime - (run / ".hydra" / "config.yaml").stat().st_mtime
    env = OmegaConf.select(cfg, "algo.env.environment._target_")  # a multi-turn run: its environment beside the task
    return {
        "task": ("+".join(tasks) or cfg.data.source._target_.rsplit(".", 1)[-1])
        + (f", env {env.rsplit('.', 1)[-1]}" if env else ""),
        "seed": cfg.seed,
        "ws": last(rows, "warm_start/exact_match"),
        "ws_steps": last(rows, "warm_start/steps"),
        "before": last(rows, "scalerl/R0"),
        "after": last(rows, "val/pass@1", before_step=test_step),
        "test": last(rows, "test/pass@1"),
        "test_maj": last(rows, "test/majority@k"),
        "k": OmegaConf.select(cfg, "algo.val_num_samples"),
        "minutes": seconds / 60,
        "by": OmegaConf.select(cfg, by) if by else None,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("runs", nargs="+", type=Path, help="run directories, or a multirun directory holding them")
    ap.add_argument("--by", help="a config key (e.g. algo.advantage): its value in a first column, rows sorted by it")
    args = ap.parse_args()
    runs = []
    for path in args.runs:
        runs += [path] if (path / ".hydra").is_dir() else sorted(p.parent.parent for p in path.glob("*/.hydra/config.yaml"))
    if not runs:
        raise SystemExit(f"no run directories (holding .hydra/config.yaml) under {args.runs}")

    def f(x, spec=".3f"):
        return "" if x is None else format(x, spec)

    first = f"| `{args.by}` " if args.by else ""
    print(first + "| task | seed | warm start (greedy EM, steps) | val pass@1 before RL | after | gain (points) | "
          "test pass@1 | test majority@k | minutes |")
    print("|---" * (10 if args.by else 9) + "|")
    rows = [summary(run, args.by) for run in runs]
    if args.by:
        rows.sort(key=lambda s: (str(s["by"]), s["seed"]))
    for s in rows:
        at_k = f" (k={s['k']})" if s["k"] else ""
        gain = None if s["before"] is None or s["after"] is None else 100 * (s["after"] - s["before"])
        lead = f"| {s['by']} " if args.by else ""
        print(f"{lead}| {s['task']} | {s['seed']} | {f(s['ws'])}, {f(s['ws_steps'], '.0f')} | {f(s['before'])} | "
              f"{f(s['after'])} | {f(gain, '+.1f')} | {f(s['test'])} | {f(s['test_maj'])}{at_k} | "
              f"{s['minutes']:.1f} |")


if __name__ == "__main__":
    main()
