"""eval.py: a checkpoint scores what its training run reported for it, for every algorithm; an HF export scores as
the checkpoint of the same weights; nothing trained is refused."""

from __future__ import annotations

import pytest

from tests.helpers import DQUICK, RLVR_RUN, ROOT, run_cli

RUNS = {
    "sft": ["algo=sft", "trainer.max_steps=6", "trainer.val_check_interval=3"],
    "dpo": ["algo=dpo", "warm_start.max_steps=0", "trainer.max_steps=6", "trainer.val_check_interval=3"],
    # a high lr: the policy moves far enough in 4 steps for its sampled test scores to show it
    "rlvr": [o for o in RLVR_RUN if o != "test=false"] + ["trainer.max_steps=4", "data.source.n_test=32", "algo.lr=1e-2"],
    "ddpm": DQUICK + ["data=toy2d", "data.n_train=1024", "data.n_val=100", "data.n_test=100", "trainer.max_steps=6",
                      "trainer.val_check_interval=3", "algo.val_num_samples=50", "algo.test_num_samples=50"],
}


@pytest.mark.parametrize("algo", list(RUNS))
def test_eval_scores_a_checkpoint_as_its_training_run_did(cfg_factory, algo):
    from eval import evaluate
    from train import build, train

    quick = algo != "ddpm"
    trained, objs = train(cfg_factory(*RUNS[algo], quick=quick))
    best = objs["trainer"].checkpoint_callback.best_model_path
    assert best
    scored, _ = evaluate(cfg_factory(*RUNS[algo], f"ckpt_path={best}", quick=quick, name="eval"))
    keys = [k for k in trained if k.startswith("test/")]
    assert keys and sorted(keys) == sorted(scored)
    for k in keys:
        assert scored[k] == pytest.approx(float(trained[k]), rel=1e-5, abs=1e-6), k
    # the same module untrained scores differently
    fresh = build(cfg_factory(*RUNS[algo], quick=quick), warm_start=False)
    fresh["trainer"].test(fresh["module"], datamodule=fresh["datamodule"])
    differs = [k for k in keys if float(fresh["trainer"].callback_metrics[k]) != pytest.approx(scored[k], rel=1e-4)]
    assert differs, "an untrained module scored as the checkpoint did: the metrics do not see the weights"


def test_eval_of_an_hf_export_equals_its_checkpoint_and_nothing_is_refused(cfg_factory, tmp_path):
    from eval import evaluate
    from train import train

    train(cfg_factory(*RUNS["sft"], "test=false"))
    last = tmp_path / "checkpoints" / "last.ckpt"
    by_ckpt, _ = evaluate(cfg_factory(*RUNS["sft"], f"ckpt_path={last}", name="eval"))
    by_export, _ = evaluate(cfg_factory("algo=sft", "model=hf", f"model.pretrained={tmp_path / 'hf'}", name="eval"))
    assert by_export == pytest.approx(by_ckpt, rel=1e-5)
    val, _ = evaluate(cfg_factory(*RUNS["sft"], f"ckpt_path={last}", "eval.split=val", name="eval"))
    assert val and all(k.startswith("val/") for k in val)
    with pytest.raises(ValueError, match="eval.py scores a trained model: pass ckpt_path"):
        evaluate(cfg_factory("algo=sft", name="eval"))


def test_eval_command_prints_the_table(tmp_path):
    """`python eval.py ckpt_path=...` as users type it."""
    import subprocess
    import sys

    r = run_cli("algo=sft", "trainer.max_steps=3", "logger=none", "test=false", f"hydra.run.dir={tmp_path / 'run'}",
                tmp=tmp_path)
    assert r.returncode == 0, r.stderr[-2000:]
    ckpt = tmp_path / "run" / "checkpoints" / "last.ckpt"
    r = subprocess.run([sys.executable, str(ROOT / "eval.py"), f"ckpt_path={ckpt}", "logger=none",
                        f"paths.log_dir={tmp_path}"], capture_output=True, text=True, cwd=tmp_path, timeout=300,
                       env={**__import__("os").environ, "PROJECT_ROOT": str(ROOT)})
    assert r.returncode == 0, r.stderr[-3000:]
    assert "test/exact_match" in r.stdout and "test/loss" in r.stdout and "last.ckpt" in r.stdout
