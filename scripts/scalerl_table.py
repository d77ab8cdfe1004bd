"""The ScaleRL table of RLVR runs: the fitted A, B, C_mid of each row (the runs that differ only by seed), their
spread over seeds and bootstrap errors, and the predictive check (the fit on the first half of the compute against
the last validation), as Markdown.

    python train.py -m experiment=<preset> loss=cispo,dapo,gspo seed=0,1,2 logger=csv
    python scripts/scalerl_table.py logs/train/multiruns/<date> ... [--plot rows.png]   # or run directories

Each run's `scalerl_fit.json` (written by `callbacks=scalerl`, src/callbacks/scalerl_curve.py) holds its last fit and
its prediction; a row groups the runs whose Hydra overrides are equal once `seed=` (and `logger=`) is removed, and
is named by its overrides that not every run shares (none: the baseline).
"""

from __future__ import annotations

import argparse
import json
from collections import defaultdict
from pathlib import Path

import numpy as np
from omegaconf import OmegaConf


def refit(fit: dict, n_boot: int = 100, predict_fraction: float = 0.5) -> dict:
    """The fit, its bootstrap errors and the predictive check redone from the run's saved points with this checkout's
    code (`src/callbacks/scalerl_curve.py`), for runs saved before the fit changed."""
    from genlight.callbacks.scalerl_curve import bootstrap_fit, predictive_check

    c, r = zip(*fit["points"])
    skip = fit.get("skip_fraction", 0.1)
    new = bootstrap_fit(c, r, r0=r[0], skip_fraction=skip, n_boot=n_boot)
    new.pop("samples")
    return {**fit, **new, "R0": r[0], "prediction": predictive_check(c, r, r0=r[0], fraction=predict_fraction,
                                                                     skip_fraction=skip)}


def load(run: Path, redo: bool = False) -> tuple[list[str], dict]:
    """(the run's overrides without the seed and the logger, the run's fit; `redo`: refitted from its points)."""
    fit_file = run / "scalerl_fit.json"
    if not fit_file.exists():
        raise SystemExit(f"{run}: no scalerl_fit.json (an RLVR run with callbacks=scalerl and enough validations)")
    overrides = OmegaConf.load(run / ".hydra" / "overrides.yaml") if (run / ".hydra" / "overrides.yaml").exists() else []
    fit = json.loads(fit_file.read_text())
    seed = next((o.split("=", 1)[1] for o in overrides if o.startswith("seed=")), "-")
    return ([o for o in overrides if not o.startswith("seed=") and not o.startswith("logger=")],
            {**(refit(fit) if redo else fit), "seed": seed})


def _mean_sd(values: list[float], fmt: str) -> str:
    v = np.asarray(values, dtype=float)
    return f"{v.mean():{fmt}} ± {v.std(ddof=1):{fmt}}" if len(v) > 1 else f"{v.mean():{fmt}}"


def group(runs: list[Path], redo: bool = False) -> tuple[list[str], dict[str, list[dict]]]:
    """(the overrides every run shares, {a row's own overrides: its runs' fits}); a row with none of its own is the
    baseline, `(baseline)`."""
    loaded = [load(run, redo) for run in runs]
    common = [o for o in loaded[0][0] if all(o in overrides for overrides, _ in loaded)] if len(loaded) > 1 else []
    rows: dict[str, list[dict]] = defaultdict(list)
    for overrides, fit in sorted(loaded, key=lambda x: str(x[1]["seed"])):  # each row's seeds in one order
        rows[" ".join(o for o in overrides if o not in common) or "(baseline)"].append(fit)
    return common, rows


def table(common: list[str], rows: dict[str, list[dict]]) -> str:
    """The Markdown table of `group`'s rows."""
    out = [f"Every row: `{' '.join(common)}`\n" if common else "",
           "| row | seeds | R0 | A (mean ± sd over seeds) | A's bootstrap error (median) | B | C_mid (FLOPs) | "
           "final pass rate | predicted - measured final pass rate, each seed |",
           "|---|---|---|---|---|---|---|---|---|"]
    for key, fits in rows.items():
        errors = [f["prediction"]["error"] for f in fits if "prediction" in f]
        finals = [f["points"][-1][1] for f in fits if f.get("points")]
        out.append(" | ".join([
            f"| `{key}`" if key != "(baseline)" else "| (baseline)", str(len(fits)),
            _mean_sd([f["R0"] for f in fits], ".3f") if all("R0" in f for f in fits) else "-",
            _mean_sd([f["A"] for f in fits], ".3f"),
            f"{np.median([f['A_se'] for f in fits]):.3f}", _mean_sd([f["B"] for f in fits], ".2f"),
            _mean_sd([f["C_mid"] for f in fits], ".2e"), _mean_sd(finals, ".3f") if finals else "-",
            ", ".join(f"{e:+.3f}" for e in errors) or "-",
        ]) + " |")
    return "\n".join(line for line in out if line)


def plot(rows: dict[str, list[dict]], path: Path, metric: str = "val/pass@1") -> None:
    """One panel per row: each seed's points and fitted sigmoid (a colour per seed), with the first row's fit of the
    same seed in grey for reference."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from genlight.callbacks.scalerl_curve import sigmoid_curve

    n = len(rows)
    cols = min(n, 3)
    fig, axes = plt.subplots((n + cols - 1) // cols, cols, figsize=(4 * cols, 3.2 * ((n + cols - 1) // cols)),
                             dpi=100, sharex=True, sharey=True, squeeze=False)
    reference = next(iter(rows.values()))
    for ax, (key, fits) in zip(axes.flat, rows.items()):
        for i, f in enumerate(fits):
            c, r = np.array(f["points"][1:]).T
            grid = np.geomspace(c.min(), c.max(), 100)
            ref = next((g for g in reference if g["seed"] == f["seed"]), None)
            if fits is not reference and ref is not None:
                ax.plot(grid, sigmoid_curve(grid, ref["R0"], ref["A"], ref["B"], ref["C_mid"]), color="0.7", lw=1)
            ax.scatter(c, r, s=8, color=f"C{i}")
            ax.plot(grid, sigmoid_curve(grid, f["R0"], f["A"], f["B"], f["C_mid"]), color=f"C{i}", lw=1,
                    label=f"seed {f['seed']}: A={f['A']:.2f}±{f['A_se']:.2f}")
        ax.set_title(key if len(key) < 48 else key[:45] + "...", fontsize=8)
        ax.set_xscale("log")
        ax.legend(fontsize=6, loc="lower right")
    for ax in axes[-1]:
        ax.set_xlabel("training compute (FLOPs)")
    for ax in axes[:, 0]:
        ax.set_ylabel(metric)
    for ax in list(axes.flat)[n:]:
        ax.set_visible(False)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("paths", nargs="+", type=Path, help="multirun directories or run directories")
    parser.add_argument("--plot", type=Path, default=None, help="also draw each row's curves and fits to this PNG")
    parser.add_argument("--refit", action="store_true",
                        help="redo each run's fit, errors and predictive check from its saved points with this code")
    args = parser.parse_args()
    runs = sorted({f.parent for p in args.paths for f in ([p / "scalerl_fit.json"] if (p / "scalerl_fit.json").exists()
                                                          else p.glob("*/scalerl_fit.json"))})
    if not runs:
        raise SystemExit(f"no scalerl_fit.json under {', '.join(map(str, args.paths))}")
    common, rows = group(runs, args.refit)  # loaded (and refitted) once, for the table and the plot
    print(table(common, rows))
    if args.plot:
        plot(rows, args.plot)
        print(f"\nplot: {args.plot}")


if __name__ == "__main__":
    main()
