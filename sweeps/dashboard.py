"""W&B workspaces, one per algorithm, built with the `wandb-workspaces` library.

    python sweeps/dashboard.py --entity ME --project genlight --algo rlvr --save   # creates it (account needed)
    python sweeps/dashboard.py --algo all                                          # prints the specs (offline)

Each workspace is a few sections of panels over the metrics our modules log. x-axes: optimizer steps
(`trainer/global_step`, what every metric is defined against) and, for RLVR, samples drawn and
training compute (`train/samples`, `val/samples`, `*/compute_flops`).
"""

from __future__ import annotations

import argparse
import json

ALGOS = ("sft", "dpo", "tr_dpo", "rlvr", "ddpm")
STEP = "trainer/global_step"

# (section, [panel]); a panel is ("line", title, x, [y...]) | ("media", title, [keys]) | ("table", key)
_EVAL_LM = ("Evaluation", [
    ("line", "held-out exact match (greedy)", STEP, ["val/exact_match"]),
    ("line", "held-out loss", STEP, ["val/loss"]),
    ("table", "val/samples"),
])
_DPO = [
    ("Implicit rewards", [
        ("line", "rewards r = beta log pi/pi_ref (train)", STEP, ["train/rewards/chosen", "train/rewards/rejected"]),
        ("line", "reward margin r_w - r_l (train, val)", STEP, ["train/rewards/margins", "val/rewards/margins"]),
        ("line", "preference accuracy P(r_w > r_l)", STEP, ["train/rewards/accuracies", "val/rewards/accuracies"]),
        ("line", "margins, per held-out pair (histogram)", STEP, ["val/rewards/margins_hist"]),
    ]),
    ("Likelihoods", [
        ("line", "log pi(y_w), log pi(y_l)", STEP, ["train/logps/chosen", "train/logps/rejected"]),
        ("line", "DPO loss", STEP, ["train/loss", "val/loss"]),
    ]),
    _EVAL_LM,
]
PANELS: dict[str, list] = {
    "sft": [
        ("Training", [
            ("line", "completion-only loss", STEP, ["train/loss", "val/loss"]),
            ("line", "next-token accuracy on completions", STEP, ["train/token_accuracy", "val/token_accuracy"]),
            ("line", "learning rate", STEP, ["lr-AdamW"]),
        ]),
        _EVAL_LM,
    ],
    "dpo": _DPO,
    "tr_dpo": _DPO + [("Reference refresh", [("line", "reference refreshes (TR-DPO)", STEP, ["ref/refreshes"])])],
    "rlvr": [
        ("Reward", [
            ("line", "mean reward against steps", STEP, ["train/reward/mean", "train/pass_rate"]),
            ("line", "mean reward against samples", "train/samples", ["train/reward/mean"]),
            ("line", "held-out pass@1 against samples", "val/samples", ["val/pass@1", "val/majority@k"]),
            ("line", "held-out pass@1 against compute (FLOPs)", "val/compute_flops", ["val/pass@1"]),
            ("line", "held-out pass@k", STEP, ["val/pass@1", "val/pass@k", "val/majority@k"]),
        ]),
        ("ScaleRL recipe", [
            ("line", "zero-variance groups, retired prompts", STEP, ["train/frac_zero_variance", "train/retired_prompts"]),
            ("line", "importance weight rho = pi_train / pi_gen", STEP, ["train/rho/mean", "train/rho/max", "train/rho/frac_truncated"]),
            ("line", "train/inference drift |log pi_train - log pi_gen|", STEP, ["train/logp_diff/mean", "train/logp_diff/max"]),
            ("line", "entropy, completion length", STEP, ["train/entropy", "train/completion_length", "train/truncation_rate"]),
            ("media", "sigmoid fit of pass rate against compute", ["scalerl/curve"]),
            ("line", "fit: asymptote A, efficiency B, C_mid", STEP, ["scalerl/A", "scalerl/B"]),
        ]),
        ("Samples", [("table", "train/completions"), ("table", "val/samples")]),
        ("Throughput", [("line", "tokens/s", STEP, ["perf/gen_tokens_per_s", "perf/train_forward_tokens_per_s"])]),
    ],
    "ddpm": [
        ("Training", [
            ("line", "denoising loss", STEP, ["train/loss", "val/loss"]),
            ("line", "learning rate", STEP, ["lr-AdamW"]),
        ]),
        ("Sample quality", [
            ("line", "Frechet distance to held-out digits (lower is better)", STEP, ["val/fd"]),
            ("line", "energy distance to held-out points (2-D data)", STEP, ["val/energy_distance"]),
            ("media", "samples (EMA weights)", ["val/samples"]),
        ]),
    ],
}


def metrics(algo: str) -> set[str]:
    """Every metric key the workspace of `algo` shows (x-axes included)."""
    keys = set()
    for _, panels in PANELS[algo]:
        for p in panels:
            if p[0] == "line":
                keys |= {p[2], *p[3]}
            elif p[0] == "media":
                keys |= set(p[2])
            else:
                keys.add(p[1])
    return keys


def build(algo: str, entity: str, project: str):
    """The `wandb_workspaces.workspaces.Workspace` of one algorithm (no network until `.save()`)."""
    import wandb_workspaces.reports.v2 as wr
    import wandb_workspaces.workspaces as ws

    if algo not in PANELS:
        raise ValueError(f"--algo {algo!r}: must be one of {list(PANELS)} or 'all'")

    def panel(p):
        if p[0] == "line":
            return wr.LinePlot(title=p[1], x=p[2], y=list(p[3]))
        if p[0] == "media":
            return wr.MediaBrowser(title=p[1], media_keys=list(p[2]))
        return wr.WeavePanelSummaryTable(table_name=p[1])

    sections = [ws.Section(name=name, panels=[panel(p) for p in panels], is_open=True) for name, panels in PANELS[algo]]
    return ws.Workspace(entity=entity, project=project, name=f"genlight: {algo}", sections=sections,
                        settings=ws.WorkspaceSettings(x_axis=STEP))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--entity", default="me")
    ap.add_argument("--project", default="genlight")
    ap.add_argument("--algo", default="all")
    ap.add_argument("--save", action="store_true", help="create the workspaces in W&B (needs an account)")
    args = ap.parse_args()
    for algo in ALGOS if args.algo == "all" else [args.algo]:
        w = build(algo, args.entity, args.project)
        if args.save:
            print(f"{algo}: {w.save().url}")
        else:
            print(json.dumps({"algo": algo, "workspace": json.loads(w._to_model().model_dump_json())})[:2000])


if __name__ == "__main__":
    main()
