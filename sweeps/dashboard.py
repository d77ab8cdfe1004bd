"""W&B workspaces, one per algorithm, built with the `wandb-workspaces` library.

    python sweeps/dashboard.py --entity ME --project genlight --algo rlvr --save   # creates it (account needed)
    python sweeps/dashboard.py --algo all                                          # prints the specs (offline)

Each workspace is a few sections of panels over the metrics our modules log. x-axes: optimizer steps
(`trainer/global_step`, what every metric is defined against) and, for RLVR, samples drawn and
training compute (`train/samples`, `val/samples`, `*/compute_flops`).
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
from pathlib import Path

# every algorithm in conf/algo/ has a workspace (a new one without its panels fails tests/test_sweeps.py)
ROOT = Path(__file__).resolve().parents[1]
ALGOS = tuple(sorted(p.stem for p in (ROOT / "conf" / "algo").glob("*.yaml")))
STEP = "trainer/global_step"


@functools.cache
def panels(algo: str) -> list:
    """The sections of `algo`'s workspace: (section, [panel]), a panel ("line", title, x, [y...]) | ("media", title,
    [keys]) | ("table", key). They live beside the code that logs their metrics: the `DASHBOARD` of the algorithm's
    LightningModule and of the callbacks its config adds (TR-DPO's reference refresh, the ScaleRL curve fit)."""
    if algo not in ALGOS:
        raise ValueError(f"--algo {algo!r}: must be one of {list(ALGOS)} or 'all'")
    import sys

    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from hydra.utils import get_class

    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose("train", overrides=[f"algo={algo}"])
    GlobalHydra.instance().clear()
    sections = list(get_class(cfg.algo._target_).DASHBOARD)
    for cb in (cfg.get("callbacks") or {}).values():
        if cb and "_target_" in cb:
            sections += list(getattr(get_class(cb._target_), "DASHBOARD", []))
    return sections


def metrics(algo: str) -> set[str]:
    """Every metric key the workspace of `algo` shows (x-axes included)."""
    keys = set()
    for _, section in panels(algo):
        for p in section:
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


    def panel(p):
        if p[0] == "line":
            return wr.LinePlot(title=p[1], x=p[2], y=list(p[3]))
        if p[0] == "media":
            return wr.MediaBrowser(title=p[1], media_keys=list(p[2]))
        return wr.WeavePanelSummaryTable(table_name=p[1])

    sections = [ws.Section(name=name, panels=[panel(p) for p in section], is_open=True) for name, section in panels(algo)]
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
            print(json.dumps({"algo": algo, "workspace": dataclasses.asdict(w)}, default=str)[:2000])


if __name__ == "__main__":
    main()
