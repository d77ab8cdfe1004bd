"""eval.py: a checkpoint scores what its training run reported for it, for every algorithm; an HF export scores as
the checkpoint of the same weights; nothing trained is refused."""

from __future__ import annotations

import pytest
import torch

from tests.helpers import ALGORITHMS, RLVR_RUN, ROOT, attach_trainer, run_cli, short_run

# every algorithm (conf/algo/): a short run that validates twice; the sampling ones (RLVR, distillation) at a high lr,
# so that the policy moves far enough in 4 steps for its sampled test scores to show it
RUNS = {algo: (short_run(algo)[0] + ["trainer.max_steps=6", "trainer.val_check_interval=3"]
               + (["trainer.max_steps=4", "data.source.n_test=32", "algo.lr=1e-2"] if algo in ("rlvr", "distill")
                  else []),
               short_run(algo)[1]) for algo in ALGORITHMS}


@pytest.mark.parametrize("algo", list(RUNS))
def test_eval_scores_a_checkpoint_as_its_training_run_did(cfg_factory, algo):
    from genlight.pipeline import build, evaluate, train

    run, quick = RUNS[algo]
    trained, objs = train(cfg_factory(*run, quick=quick))
    best = objs["trainer"].checkpoint_callback.best_model_path
    assert best
    scored, _ = evaluate(cfg_factory(*run, f"ckpt_path={best}", quick=quick, name="eval"))
    keys = [k for k in trained if k.startswith("test/")]
    assert keys and sorted(keys) == sorted(scored)
    for k in keys:
        assert scored[k] == pytest.approx(float(trained[k]), rel=1e-5, abs=1e-6), k
    # the same module untrained scores differently
    fresh = build(cfg_factory(*run, quick=quick), warm_start=False)
    fresh["trainer"].test(fresh["module"], datamodule=fresh["datamodule"])
    differs = [k for k in keys if float(fresh["trainer"].callback_metrics[k]) != pytest.approx(scored[k], rel=1e-4)]
    assert differs, "an untrained module scored as the checkpoint did: the metrics do not see the weights"


def test_eval_of_an_hf_export_equals_its_checkpoint_and_nothing_is_refused(cfg_factory, tmp_path):
    from genlight.pipeline import evaluate, train

    train(cfg_factory(*RUNS["sft"][0], "test=false"))
    last = tmp_path / "checkpoints" / "last.ckpt"
    by_ckpt, _ = evaluate(cfg_factory(*RUNS["sft"][0], f"ckpt_path={last}", name="eval"))
    by_export, _ = evaluate(cfg_factory("algo=sft", "model=hf", f"model.pretrained={tmp_path / 'hf'}", name="eval"))
    assert by_export == pytest.approx(by_ckpt, rel=1e-5)
    val, _ = evaluate(cfg_factory(*RUNS["sft"][0], f"ckpt_path={last}", "eval.split=val", name="eval"))
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


# ----------------------------------------------------------------------------- test-time compute
def test_curves_at_k_equal_their_definitions_by_enumeration():
    """pass@k = the share of k-subsets of the n samples with a correct one; majority@k and best_of@k read the first k
    samples (ties: the first); two prompts, averaged."""
    from itertools import combinations

    from genlight.test_time import CurvesAtK

    correct = [[False, True, False, True, False], [True, False, False, False, False]]
    answers = [["3", "5", "3", "5", "5"], ["7", "8", "8", "9", None]]
    scores = [[0.1, -1.0, 0.3, 2.0, 0.0], [-0.5, 0.2, 0.1, -2.0, 3.0]]
    m = CurvesAtK(5)
    m.update(correct, answers, scores)
    got = m.compute()
    for k in range(1, 6):
        want_pass = sum(sum(any(c[i] for i in s) for s in combinations(range(5), k)) / len(list(combinations(range(5), k)))
                        for c in correct) / 2
        assert got["pass"][k - 1] == pytest.approx(want_pass)
    # majority of the first k: prompt 1: 3 | 3,5 tie -> 3 | 3 | 3,5 tie -> 3 | 5 wins; prompt 2: 7 | 7 | 8 | 8 | 8
    assert got["majority"] == pytest.approx([0.5, 0.5, 0.0, 0.0, 0.5])
    # best score among the first k: prompt 1: 0.1 (F) | 0.1 | 0.3 (F) | 2.0 (T) | T; prompt 2: -0.5 (T) | 0.2 (F) ...
    assert got["best"] == pytest.approx([0.5, 0.0, 0.0, 0.5, 0.5])
    with pytest.raises(ValueError, match="eval.num_samples=5"):
        m.update([[True]], [["1"]], [[0.0]])


def test_eval_test_time_compute_at_low_temperature_is_greedy_and_writes_its_curves(cfg_factory, tmp_path):
    """Near-greedy sampling (temperature 1e-4): every sample is the greedy completion, so pass@k, majority@k and
    best-of-k equal, at every k, the share of greedy completions (transformers' own `generate`) that the verifier
    accepts; the plot is written; at temperature 1 pass@1 differs. The verifier is the tests' parity one, which
    accepts some completions of any model (exact match would be 0 for a model this small)."""
    from genlight.pipeline import evaluate, train
    from tests.helpers import parity_reward

    train(cfg_factory(*RUNS["sft"][0], "test=false"))
    last = tmp_path / "checkpoints" / "last.ckpt"
    run = [*RUNS["sft"][0], f"ckpt_path={last}", "eval.num_samples=3", "data.source.n_test=64",
           "+eval.verifier._target_=tests.helpers.parity_reward", "+eval.verifier._partial_=true"]
    cold, objs = evaluate(cfg_factory(*run, "eval.temperature=1e-4", name="eval"))
    module, ok, tok = objs["module"], [], objs["module"].tokenizer
    for batch in objs["datamodule"].test_dataloader():
        ids = batch["prompt_input_ids"]
        out = module.model.generate(input_ids=ids, attention_mask=batch["prompt_attention_mask"], do_sample=False,
                                    max_new_tokens=module.hparams.max_new_tokens, pad_token_id=tok.pad_token_id,
                                    eos_token_id=tok.eos_token_id)[:, ids.size(1):]
        texts = tok.batch_decode(out, skip_special_tokens=True)
        # correct as RLVR's pass@k counts it: accepted, and ended by <eos> within max_new_tokens
        ok += [parity_reward(t, a) and tok.eos_token_id in row.tolist() for t, a, row in zip(texts, batch["references"], out)]
    greedy = sum(ok) / len(ok)
    assert 0 < greedy < 1 and len(ok) == 64
    for k in (1, 2, 3):
        for name in ("pass", "majority", "best_of"):
            assert cold[f"test/ttc/{name}@{k}"] == pytest.approx(greedy), f"{name}@{k}"
    assert (tmp_path / "test_time_compute.png").stat().st_size > 0
    hot, _ = evaluate(cfg_factory(*run, "eval.temperature=1.0", "logger=csv", name="eval"))
    assert hot["test/ttc/pass@1"] != pytest.approx(greedy)
    # what reached the CSV log (written after the test loop finalized the logger) and the curves' JSON
    import csv
    import json

    (path,) = tmp_path.glob("csv/version_*/metrics.csv")
    rows = [r for r in csv.DictReader(path.open()) if r.get("test/ttc/pass@1")]
    assert [float(rows[0][f"test/ttc/pass@{k}"]) for k in (1, 2, 3)] == pytest.approx([hot[f"test/ttc/pass@{k}"] for k in (1, 2, 3)])
    saved = json.loads((tmp_path / "test_time_compute.json").read_text())
    assert saved["majority"] == pytest.approx([hot[f"test/ttc/majority@{k}"] for k in (1, 2, 3)])
    with pytest.raises(ValueError, match="eval.num_samples: test-time compute .* language models"):
        evaluate(cfg_factory(*RUNS["ddpm"][0], f"ckpt_path={last}", "eval.num_samples=2", quick=False, name="eval"))


def test_no_test_split_means_no_test_metrics(cfg_factory, tmp_path, sft_jsonl):
    """Data without a test file has no test split: train.py's test stage is skipped (no test/ metric, which came from
    the val split that chose the best checkpoint), eval.py with eval.split=test stops naming the key, and
    eval.split=val scores that split under its own name."""
    from genlight.pipeline import evaluate, train

    data = ["data=jsonl_sft", f"data.source.train={sft_jsonl}", "data.batch_size=8"]
    run = ["algo=sft", *data, "trainer.max_steps=2", "trainer.val_check_interval=2"]
    metrics, _ = train(cfg_factory(*run, "logger=none", "trainer.accelerator=cpu", "extras.print_config=false",
                                   quick=False))
    assert any(k.startswith("val/") for k in metrics) and not any(k.startswith("test/") for k in metrics)
    ckpt = f"ckpt_path={tmp_path / 'checkpoints' / 'last.ckpt'}"
    with pytest.raises(ValueError, match=r"eval.split=test: the data has no test split \(data.source.test is not set\)"):
        evaluate(cfg_factory(*run, ckpt, "logger=none", "trainer.accelerator=cpu", quick=False, name="eval"))
    val, _ = evaluate(cfg_factory(*run, ckpt, "eval.split=val", "logger=none", "trainer.accelerator=cpu", quick=False,
                                  name="eval"))
    assert val and all(k.startswith("val/") for k in val)


@pytest.mark.parametrize("truncated_reward, want", [("0.0", 0.5), ("null", 1.0)])
def test_rlvr_pass_at_k_and_test_time_compute_share_one_definition_of_correct(cfg_factory, monkeypatch,
                                                                           truncated_reward, want):
    """The same samples are correct for RLVR's val/pass@k and for eval.py's test-time compute (`genlight.rewards.passes`):
    each prompt gets its answer twice, once ended by <eos> and once cut at max_new_tokens. With the run's
    algo.truncated_reward set the cut one fails in both (pass@1 0.5), with null both verify it as it is (1.0)."""

    from genlight.datamodules.lm import pad
    from genlight.models.rollout import HFRollout, Rollout
    from genlight.pipeline import build
    from genlight.test_time import curves_at_k

    run = [o for o in RLVR_RUN if not o.startswith("reward")] + ["reward=exact", "data.source.n_val=8",
                                                                   f"algo.truncated_reward={truncated_reward}"]
    module = build(cfg_factory(*run), warm_start=False)
    module, dm = attach_trainer(module["module"]), module["datamodule"]
    dm.setup("validate")
    batch = next(iter(dm.val_dataloader()))
    tok = module.tokenizer
    ids = [tok(a, add_special_tokens=False)["input_ids"] for a in batch["references"]]
    rows = [x for i in ids for x in (i + [tok.eos_token_id], i)]  # ended, then cut (no <eos>)
    completion = pad(rows, tok.pad_token_id)
    fixed = Rollout(completion, pad([[1] * len(r) for r in rows], 0).bool(), torch.zeros(completion.shape),
                    torch.tensor([False, True] * len(ids)))
    monkeypatch.setattr(HFRollout, "generate", lambda self, *a, **k: fixed)
    module._eval_step(batch, 0, "val")
    rlvr = float(module.val_pass.compute()["pass@1"])
    curves = curves_at_k(module, [batch], 2, 1.0, module.verifier)
    assert rlvr == pytest.approx(want) and curves["pass"][0] == pytest.approx(want)


def test_test_time_compute_refuses_a_multi_turn_run(cfg_factory):
    """eval.num_samples samples single completions: on a multi-turn (env=) run it would score completions that never
    call the tool; it stops before any work, naming what to use instead."""
    from genlight.pipeline import evaluate

    with pytest.raises(ValueError, match=r"eval.num_samples: .* multi-turn \(env=\) run"):
        evaluate(cfg_factory("experiment=calculator_tool", "model.net.hidden_size=32", "model.net.num_layers=1",
                             "model.net.num_heads=2", "model.net.intermediate_size=64", "eval.num_samples=2",
                             "ckpt_path=null", "+model.pretrained=unused", name="eval"))
