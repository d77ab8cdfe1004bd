"""The ScaleRL table of RLVR runs: the fitted A, B, C_mid of each row (the runs that differ only by seed), their
spread over seeds and bootstrap errors, and the predictive check (the fit on the first half of the compute against
the last validation), as Markdown.

    python train.py -m experiment=<preset> algo.loss_type=cispo,dapo,gspo seed=0,1,2 logger=csv
    python scripts/scalerl_table.py logs/train/multiruns/<date>        # or run directories, one or more

Each run's `scalerl_fit.json` (written by `callbacks=scalerl`, src/callbacks/scalerl_curve.py) holds its last fit and
its prediction; a row groups the runs whose Hydra overrides are equal once `seed=` is removed.
"""

from __future__ import annotations

import argparse
import json
from collections import defaultdict
from pathlib import Path

import numpy as np
from omegaconf import OmegaConf


def load(run: Path) -> tuple[str, dict]:
    """(the row's overrides without the seed, the run's fit)."""
    fit_file = run / "scalerl_fit.json"
    if not fit_file.exists():
        raise SystemExit(f"{run}: no scalerl_fit.json (an RLVR run with callbacks=scalerl and enough validations)")
    overrides = OmegaConf.load(run / ".hydra" / "overrides.yaml") if (run / ".hydra" / "overrides.yaml").exists() else []
    row = " ".join(o for o in overrides if not o.startswith("seed=") and not o.startswith("logger=")) or "(defaults)"
    return row, json.loads(fit_file.read_text())


def _mean_sd(values: list[float], fmt: str) -> str:
    v = np.asarray(values, dtype=float)
    return f"{v.mean():{fmt}} ± {v.std(ddof=1):{fmt}}" if len(v) > 1 else f"{v.mean():{fmt}}"


def table(runs: list[Path]) -> str:
    rows: dict[str, list[dict]] = defaultdict(list)
    for run in runs:
        key, fit = load(run)
        rows[key].append(fit)
    out = ["| row | seeds | A (mean ± sd over seeds) | A's bootstrap error (median) | B | C_mid (FLOPs) | "
           "predicted - measured final pass rate, each seed |",
           "|---|---|---|---|---|---|---|"]
    for key, fits in rows.items():
        errors = [f["prediction"]["error"] for f in fits if "prediction" in f]
        out.append(" | ".join([
            f"| `{key}`", str(len(fits)), _mean_sd([f["A"] for f in fits], ".3f"),
            f"{np.median([f['A_se'] for f in fits]):.3f}", _mean_sd([f["B"] for f in fits], ".2f"),
            _mean_sd([f["C_mid"] for f in fits], ".2e"),
            ", ".join(f"{e:+.3f}" for e in errors) or "-",
        ]) + " |")
    return "\n".join(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("paths", nargs="+", type=Path, help="multirun directories or run directories")
    args = parser.parse_args()
    runs = sorted({f.parent for p in args.paths for f in ([p / "scalerl_fit.json"] if (p / "scalerl_fit.json").exists()
                                                          else p.glob("*/scalerl_fit.json"))})
    if not runs:
        raise SystemExit(f"no scalerl_fit.json under {', '.join(map(str, args.paths))}")
    print(table(runs))


if __name__ == "__main__":
    main()
