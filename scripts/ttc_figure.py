"""One figure of test-time-compute curves (pass@k, majority@k against k) for several evaluated checkpoints, from the
`test_time_compute.json` that `python eval.py ... eval.num_samples=n` writes into its run directory:

    python scripts/ttc_figure.py --out docs/ttc_default_checkpoints.png "SFT=logs/eval/runs/<a>" "RLVR=logs/eval/runs/<b>"
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("runs", nargs="+", help="LABEL=RUN_DIR (an eval run directory holding test_time_compute.json)")
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args()
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.6), sharey=True)
    for spec in args.runs:
        label, _, run = spec.rpartition("=")
        path = Path(run) / "test_time_compute.json"
        if not path.is_file():
            raise SystemExit(f"{spec}: no {path} (run eval.py with eval.num_samples=n first)")
        curves = json.loads(path.read_text())
        ks = list(range(1, len(curves["pass"]) + 1))
        line = axes[0].plot(ks, curves["pass"], marker=".", label=label)[0]
        axes[1].plot(ks, curves["majority"], marker=".", color=line.get_color(), label=label)
    for ax, name in zip(axes, ("pass@k (any of k samples correct)", "majority@k (self-consistency)")):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("k (samples per prompt)")
        ax.set_title(name, fontsize=10)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("test prompts solved")
    axes[1].legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.out, dpi=110)
    print(args.out)


if __name__ == "__main__":
    main()
