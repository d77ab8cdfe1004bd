"""The distillation learning table and plot: held-out pass@1 against training FLOPs for several methods from the same
start, a few seeds each, and the compute each needs to come within `--margin` of its seed's teacher.

    python scripts/distill_table.py --teacher RLVR_RUN_S1,RLVR_RUN_S2,RLVR_RUN_S3 \
        --runs "RLVR=RLVR_RUN_S1,RLVR_RUN_S2,RLVR_RUN_S3" --runs "on-policy distillation=D1,D2,D3" \
        --sft "SFT on teacher samples=SFT_RUN_S1,SFT_RUN_S2,SFT_RUN_S3" --sampling-flops F1,F2,F3 \
        [--points "NAME=a.json,b.json,c.json"] [--start R0_1,R0_2,R0_3] [--start-of "NAME=s1,s2,s3"] --plot out.png

A run directory (logger=csv) gives its `val/pass@1` against `val/compute_flops`; a points file is a JSON list of
[flops, pass@1] pairs. An SFT run on teacher samples (`scripts/teacher_samples.py`, then `algo=sft` with a checkpoint
at every validation, each scored by `eval.py eval.split=val eval.num_samples=8` into `<run>/eval_<checkpoint>/`) gives
its checkpoints' sampled pass@1 against the teacher's sampling FLOPs (`--sampling-flops`, what teacher_samples.py
printed) + 6 N a trained token (its rows' prompt + completion + <eos> tokens, `data.batch_size` rows a step). The teacher of
seed i is the last val/pass@1 of the i-th `--teacher` run; `--start` are the pass@1 values at zero compute (default:
each teacher run's `scalerl/R0`, the warm start's pass@1 before RL, shared by every method that starts from it);
`--start-of` gives a method that starts elsewhere (a narrower student's own warm start) its own: values, or the
`eval.py` run directories of those starts (their `test_time_compute.json`).
"""

from __future__ import annotations

import argparse
import csv
import json
from pathlib import Path


def curve(path: str) -> list[tuple[float, float]]:
    p = Path(path)
    if p.suffix == ".json":
        return [(float(f), float(v)) for f, v in json.loads(p.read_text())]
    rows = list(csv.DictReader(open(next(p.glob("csv/version_*/metrics.csv")))))
    return [(float(r["val/compute_flops"]), float(r["val/pass@1"])) for r in rows
            if r.get("val/pass@1") and r.get("val/compute_flops")]


def sft_curve(path: str, sampling_flops: float) -> list[tuple[float, float]]:
    import hydra
    from omegaconf import OmegaConf

    from genlight.models.lm import from_pretrained

    run = Path(path)
    cfg = OmegaConf.load(run / ".hydra" / "config.yaml")
    tok = hydra.utils.instantiate(cfg.model.tokenizer)
    n = sum(p.numel() for p in from_pretrained(tok, cfg.model.pretrained).parameters())
    rows = [json.loads(line) for line in open(cfg.data.source.train)]
    per_row = sum(len(tok(r["prompt"]).input_ids) + len(tok(r["completion"], add_special_tokens=False).input_ids) + 1
                  for r in rows) / len(rows)
    points = []
    for ttc in sorted(run.glob("eval_step*/test_time_compute.json")):
        step = int(ttc.parent.name.removeprefix("eval_step"))
        points.append((sampling_flops + 6 * n * per_row * cfg.data.batch_size * step, json.loads(ttc.read_text())["pass"][0]))
    return points


def teacher_and_start(path: str) -> tuple[float, float | None]:
    rows = list(csv.DictReader(open(next(Path(path).glob("csv/version_*/metrics.csv")))))
    last = [float(r["val/pass@1"]) for r in rows if r.get("val/pass@1")][-1]
    r0 = [float(r["scalerl/R0"]) for r in rows if r.get("scalerl/R0")]
    return last, (r0[0] if r0 else None)


def reach(points: list[tuple[float, float]], target: float) -> float | None:
    """The compute of the first evaluation at or above `target` (None: never)."""
    return next((f for f, v in sorted(points) if v >= target), None)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--teacher", required=True)
    ap.add_argument("--runs", action="append", default=[])
    ap.add_argument("--points", action="append", default=[])
    ap.add_argument("--sft", action="append", default=[])
    ap.add_argument("--sampling-flops", default=None)
    ap.add_argument("--start", default=None)
    ap.add_argument("--start-of", action="append", default=[])
    ap.add_argument("--margin", type=float, default=0.05)
    ap.add_argument("--plot", default=None)
    a = ap.parse_args()
    teachers = [teacher_and_start(p) for p in a.teacher.split(",")]
    starts = [float(x) for x in a.start.split(",")] if a.start else [s for _, s in teachers]
    methods = {}
    for spec in a.runs + a.points:
        name, paths = spec.split("=", 1)
        methods[name] = [curve(p) for p in paths.split(",")]
    for spec in a.sft:
        name, paths = spec.split("=", 1)
        flops = [float(x) for x in a.sampling_flops.split(",")]
        methods[name] = [sft_curve(p, f) for p, f in zip(paths.split(","), flops)]
    own = {}
    for spec in a.start_of:
        name, values = spec.split("=", 1)
        own[name] = [float(v) if not Path(v).is_dir() else json.loads((Path(v) / "test_time_compute.json").read_text())
                     ["pass"][0] for v in values.split(",")]
    fmt = lambda f: "not reached" if f is None else f"{f:.2e}"  # noqa: E731
    print("| seed | teacher pass@1 | start |")
    print("|---|---|---|")
    for i, ((t, _), s) in enumerate(zip(teachers, starts)):
        print(f"| {i + 1} | {t:.3f} | {s:.3f} |")
    print()
    print(f"| method | start, per seed | pass@1 at the end, per seed | mean | best per seed | FLOPs to within {a.margin} "
          "of the teacher, per seed | FLOPs at the end |")
    print("|---|---|---|---|---|---|---|")
    for name, curves in methods.items():
        ends = [c[-1][1] for c in curves]
        st = own.get(name, starts)
        best = [max(v for _, v in c) for c in curves]
        need = [reach(c, teachers[i][0] - a.margin) for i, c in enumerate(curves)]
        print(f"| {name} | {', '.join(f'{x:.3f}' for x in st)} | {', '.join(f'{e:.3f}' for e in ends)} | {sum(ends) / len(ends):.3f} | "
              f"{', '.join(f'{b:.3f}' for b in best)} | {', '.join(fmt(n) for n in need)} | "
              f"{', '.join(f'{c[-1][0]:.2e}' for c in curves)} |")
    if a.plot:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(7, 4.2))
        colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
        for k, (name, curves) in enumerate(methods.items()):
            st = own.get(name, starts)
            for i, c in enumerate(curves):
                pts = ([(0.0, st[i])] if st[i] is not None and c and c[0][0] > 0 else []) + c
                ax.plot([f for f, _ in pts], [v for _, v in pts], color=colors[k % len(colors)], alpha=0.8, marker=".",
                        label=name if i == 0 else None)
        for i, (t, _) in enumerate(teachers):
            ax.axhline(t, color="gray", ls="--", lw=0.8, label="teachers (RLVR policies)" if i == 0 else None)
        ax.set_xlabel("training FLOPs (the teacher's forward passes and samples included)")
        ax.set_ylabel("held-out pass@1 (500 prompts x 8, T=1)")
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
        fig.tight_layout()
        fig.savefig(a.plot, dpi=120)
        print(f"\nplot: {a.plot}")


if __name__ == "__main__":
    main()
