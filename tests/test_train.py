"""train.py end to end: fast_dev_run, what reached W&B, the HF export, and learning."""

from __future__ import annotations

import pytest
import torch

from genlight.pipeline import train
from tests.helpers import leet as _leet
from tests.helpers import train_with


def test_fast_dev_run(cfg_factory):
    metrics, objs = train(cfg_factory("debug=fdr"))
    assert objs["trainer"].global_step == 1
    assert {"train/loss", "test/exact_match", "test/loss"} <= set(metrics)
    assert torch.isfinite(metrics["test/loss"])


def test_wandb_offline_run_holds_metrics_config_and_samples(cfg_factory, tmp_path):
    cfg = cfg_factory("logger=wandb", "algo.lr=0.002", "tags=[unit]", "test=false")
    train(cfg)
    runs = list((tmp_path / "wandb").glob("offline-run-*"))
    assert len(runs) == 1, "no offline W&B run was written"
    summary = _leet(runs[0], summary=True)
    assert summary["state"] == "finished" and summary["tags"] == ["unit"]
    config = summary["config"]
    assert config["algo"]["lr"] == 0.002 and config["data"]["source"]["digits"] == 2
    assert config["optimized_metric"] == "val/exact_match"
    assert config["model/params/total"] > 1e6
    assert summary["summary"]["val/samples"]["ncols"] == 4
    history = [r["history"]["item"] for r in _leet(runs[0], summary=False) if r["type"] == "history"]
    losses = [h["train/loss"] for h in history if "train/loss" in h]
    assert len(losses) == 4 and all(x > 0 for x in losses)
    assert [h["val/exact_match"] for h in history if "val/exact_match" in h], "no val/exact_match row"
    assert any("val/token_accuracy" in h for h in history)


def test_hf_export_reloads_with_identical_logits(cfg_factory, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    _, objs = train(cfg_factory("callbacks=default", "test=false"))
    export = tmp_path / "hf"
    assert (export / "config.json").is_file() and (export / "tokenizer.json").is_file()
    model = AutoModelForCausalLM.from_pretrained(export, local_files_only=True).eval()
    tok = AutoTokenizer.from_pretrained(export, local_files_only=True)
    ours = objs["module"].model.eval()
    ids = tok(["12+34=", "7+8="], padding=True, return_tensors="pt")
    assert ids.input_ids[0, 0] == tok.bos_token_id and tok.pad_token == "<pad>"
    with torch.no_grad():
        a = model(**ids).logits
        b = ours(**ids).logits
    assert torch.equal(a, b)
    # and the export differs from a fresh model: it is the trained one
    fresh = objs["module"].model.__class__(model.config)
    assert not torch.equal(fresh(**ids).logits, a)
    # the checkpoint is there too, and the next algorithm can start from the export
    assert (tmp_path / "checkpoints" / "last.ckpt").is_file()


def test_model_hf_starts_from_an_export(cfg_factory, hf_dir):
    metrics, objs = train(cfg_factory("model=hf", f"model.pretrained={hf_dir}", "debug=fdr"))
    assert objs["module"].model.config.hidden_size == 32  # the saved model, not the default


def test_csv_logger(cfg_factory, tmp_path):
    train(cfg_factory("logger=csv", "test=false"))
    rows = (tmp_path / "csv" / "version_0" / "metrics.csv").read_text().splitlines()
    assert "train/loss" in rows[0] and "val/exact_match" in rows[0] and len(rows) > 4


@pytest.mark.slow
def test_sft_learns_arithmetic(cfg_factory):
    """From an untrained model (exact match 0), a short run gets well above it on held-out problems."""
    cfg = cfg_factory(
        # 600 steps: past the steep part of the curve (3% at 250, 60% at 500), where float-level differences move
        # the exact match at a given step by several points
        "trainer.max_steps=600", "trainer.val_check_interval=200", "trainer.log_every_n_steps=50",
        "data.source.n_train=8000", "data.source.n_val=200", "data.source.n_test=200", "data.batch_size=128",
        "algo.warmup_steps=50", "test=false",
    )
    import lightning as L
    from hydra.utils import instantiate

    metrics, objs = train(cfg)
    start = L.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False)
    # the start: the same model, freshly initialised
    fresh = instantiate(cfg.algo, net=instantiate(cfg.model.net), tokenizer=objs["module"].tokenizer)
    before = start.validate(fresh, datamodule=objs["datamodule"], verbose=False)[0]["val/exact_match"]
    after = metrics["val/exact_match"].item()
    assert before < 0.05
    assert after > 0.3, f"val/exact_match only rose from {before:.3f} to {after:.3f}"


def test_the_final_weights_are_validated_once_when_the_last_step_is_not_a_val_step(cfg_factory):
    """A run shorter than one validation interval validates at its last step (no KeyError for the
    sweepers' metric); a last step that is a validation step anyway validates once, not twice."""
    import lightning as L

    from genlight.utils import get_metric_value
    from tests.helpers import train_with

    class CountVal(L.Callback):
        def __init__(self):
            self.steps = []

        def on_validation_end(self, trainer, module):
            if not trainer.sanity_checking:
                self.steps.append(trainer.global_step)

    short = CountVal()
    metrics, objs = train_with(cfg_factory("trainer.max_steps=3", "trainer.val_check_interval=250", "test=false"), short)
    assert short.steps == [3]
    # the returned metric is the final weights' (validated again here, apart)
    final = L.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False)
    again = final.validate(objs["module"], datamodule=objs["datamodule"], verbose=False)[0]
    assert get_metric_value(metrics, "val/exact_match") == pytest.approx(again["val/exact_match"])
    aligned = CountVal()
    train_with(cfg_factory("trainer.max_steps=4", "trainer.val_check_interval=2", "test=false"), aligned)
    assert aligned.steps == [2, 4]
    accumulated = CountVal()  # 2 batches a step: the last step is the 6th batch, not the 5th
    train_with(cfg_factory("trainer.max_steps=3", "trainer.accumulate_grad_batches=2", "trainer.val_check_interval=250",
                           "test=false"), accumulated)
    assert accumulated.steps == [3]


@pytest.mark.parametrize("target, steps", [(0.0, 2), (1.1, 6)])
def test_warm_start_stops_at_its_target_or_its_cap_and_is_logged(cfg_factory, tmp_path, target, steps):
    """The warm start trains until val exact match reaches `target` (checked every val_every steps), at most
    max_steps; its quality reaches the run's logger as warm_start/exact_match."""
    cfg = cfg_factory("algo=dpo", f"warm_start.target={target}", "warm_start.val_every=2", "warm_start.max_steps=6",
                      "logger=csv", "trainer.max_steps=2", "test=false")
    _, objs = train(cfg)
    import hydra
    from transformers import AutoModelForCausalLM

    # the export is the policy DPO started from: its reference (pi_ref = pi_0), not the fresh initialisation
    export = AutoModelForCausalLM.from_pretrained(tmp_path / "sft_init", local_files_only=True).state_dict()
    ref = objs["module"].ref_model.state_dict()
    fresh = hydra.utils.instantiate(cfg.model.net)(tokenizer=objs["module"].tokenizer).state_dict()
    assert all(torch.equal(export[k], ref[k]) for k in export)
    assert any(not torch.equal(export[k], fresh[k]) for k in export)
    import csv

    rows = list(csv.DictReader((tmp_path / "csv" / "version_0" / "metrics.csv").open()))
    (row,) = [r for r in rows if r.get("warm_start/exact_match")]
    assert float(row["warm_start/steps"]) == steps
    # the logged quality is the export's greedy exact match on the val split, scored again apart
    import lightning as L

    from genlight import SFTModule

    dm = hydra.utils.instantiate(cfg.data, tokenizer=objs["module"].tokenizer, kind="sft")
    dm.setup("fit")
    longest = max(len(e["completion_ids"]) for e in dm.examples["val"])
    sft = SFTModule(net=str(tmp_path / "sft_init"), max_new_tokens=longest)
    again = L.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False).validate(
        sft, datamodule=dm, verbose=False)[0]
    assert float(row["warm_start/exact_match"]) == pytest.approx(again["val/exact_match"], abs=1e-6)


def test_warm_start_cache_gives_the_same_run_without_training_and_keys_on_what_changes_it(tmp_path, monkeypatch):
    """warm_start.cache_dir: the first run trains and stores its warm start; a second run with the same settings (its
    algorithm's options may differ) loads it without training, and both RL runs end at the same weights (the RNG is
    re-seeded after the warm start, hit or miss). A different seed or warm-start setting is a different key."""
    from genlight.lightning_modules import sft
    from genlight.pipeline import train
    from tests.conftest import make_cfg

    cache = tmp_path / "cache"
    common = ["algo=rlvr", "warm_start.target=1.1", "warm_start.max_steps=3", "warm_start.val_every=3",
              f"warm_start.cache_dir={cache}", "trainer.max_steps=2", "test=false", "logger=none",
              "callbacks=default", "trainer.num_sanity_val_steps=0"]
    _, first = train(make_cfg(tmp_path / "a", common))
    (entry,) = cache.iterdir()
    assert (entry / "warm_start.json").exists() and not list(cache.glob("*.tmp*"))

    trained = []
    real = sft.warm_start
    monkeypatch.setattr(sft, "warm_start", lambda *a, **k: trained.append(1) or real(*a, **k))
    _, second = train(make_cfg(tmp_path / "b", common))
    assert not trained, "the second run trained its warm start again"
    for (k, v), (_, w) in zip(first["module"].model.state_dict().items(), second["module"].model.state_dict().items()):
        assert torch.equal(v, w), k
    # the algorithm's own options are not the warm start's: still a hit
    train(make_cfg(tmp_path / "c", [*common, "loss=dapo"]))
    assert not trained and len(list(cache.iterdir())) == 1
    for changed in ("seed=7", "warm_start.lr=5e-4"):
        cfg = make_cfg(tmp_path / "d", [*common, changed])
        assert sft.warm_start_key(cfg) != entry.name, changed


def test_train_false_scores_the_given_checkpoint_and_refuses_to_score_none(cfg_factory):
    """train=false test=true ckpt_path=X gives X's test scores (those its training run reported for it); without
    ckpt_path it stops instead of scoring a freshly initialised model."""
    from genlight.pipeline import train

    trained, objs = train(cfg_factory("algo=sft", "trainer.max_steps=6", "trainer.val_check_interval=3"))
    best = objs["trainer"].checkpoint_callback.best_model_path
    assert best
    scored, _ = train(cfg_factory("algo=sft", "train=false", f"ckpt_path={best}"))
    assert float(scored["test/loss"]) == pytest.approx(float(trained["test/loss"]), rel=1e-6)
    with pytest.raises(ValueError, match="train=false evaluates a checkpoint: pass ckpt_path"):
        train(cfg_factory("algo=sft", "train=false"))


def test_last_checkpoint_is_the_latest_validation_even_when_the_metric_did_not_improve(cfg_factory, tmp_path):
    """Validations at steps 3 and 6, the monitored metric (val/loss, mode max) worse at 6: the best checkpoint is
    step 3's and `last.ckpt` (what ckpt_path=last resumes) is step 6's, not a copy of the best."""
    import torch

    from genlight.pipeline import train

    _, objs = train(cfg_factory("algo=sft", "trainer.max_steps=6", "trainer.val_check_interval=3", "test=false",
                                "optimized_metric=val/loss", "monitor_mode=max"))
    best = objs["trainer"].checkpoint_callback.best_model_path
    assert torch.load(best, weights_only=True)["global_step"] == 3, "the metric improved at step 6: no test"
    assert torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == 6


class ModesAtFirstBatch:
    """Records, at the first training batch, which of the module's submodules are in train mode."""

    def __new__(cls, plant_policy_eval: bool = False):
        import lightning as L

        class Recorder(L.Callback):
            def __init__(self):
                self.modes = None

            def on_fit_start(self, trainer, pl_module):
                if plant_policy_eval:  # a policy left in eval mode (callbacks' on_fit_start runs before the module's)
                    pl_module.model.eval()

            def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
                if self.modes is None:
                    frozen = {id(x) for m in pl_module.frozen_models() for x in m.modules()}
                    self.modes = {
                        "policy": [m.training for m in pl_module.model.modules()],
                        "frozen": [m.training for m in pl_module.modules() if id(m) in frozen],
                    }

        return Recorder()


@pytest.mark.parametrize("algo", ["dpo", "rlvr"])
def test_a_policy_loaded_from_a_checkpoint_trains_in_train_mode_and_its_frozen_copies_in_eval(cfg_factory, hf_dir,
                                                                                             algo):
    """`from_pretrained` returns a model in eval mode, and Lightning keeps each module's mode: before, the policy
    trained without dropout (policy.training False at the first batch) and the filtered warning hid it. Now every
    policy module trains in train mode, the reference (and RLVR's lagged generator) stay in eval mode, and
    Lightning's warning, no longer filtered, is not raised for them."""
    import warnings

    from tests.helpers import RLVR_RUN

    run = [o for o in RLVR_RUN if o != "test=false"] if algo == "rlvr" else ["algo=dpo", "warm_start.max_steps=0"]
    cfg = cfg_factory(*run, "model=hf", f"model.pretrained={hf_dir}", "trainer.max_steps=2", "test=false",
                      "trainer.enable_progress_bar=false")
    rec = ModesAtFirstBatch()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _, objs = train_with(cfg, rec)
    assert rec.modes["policy"] and all(rec.modes["policy"]), "a policy module trains in eval mode"
    assert rec.modes["frozen"] and not any(rec.modes["frozen"]), "a frozen copy trains in train mode"
    assert not [w for w in caught if "in eval mode at the start of training" in str(w.message)]

    planted = ModesAtFirstBatch(plant_policy_eval=True)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _, objs = train_with(cfg_factory(*run, "trainer.max_steps=1", "test=false",
                                         "trainer.enable_progress_bar=false"), planted)
    n_policy = len(list(objs["module"].model.modules()))
    said = [str(w.message) for w in caught if "in eval mode at the start of training" in str(w.message)]
    assert said and said[0].startswith(f"Found {n_policy} module(s) in eval mode"), said


def test_a_fit_with_no_step_left_leaves_the_frozen_copies_in_eval_mode(tmp_path, tokenizer):
    """The frozen copies are flagged as training for Lightning's eval-mode check between on_fit_start and
    on_train_start; a fit resumed at max_steps trains nothing and skips on_train_start: on_fit_end puts them back
    (before, the reference kept dropout on after such a fit)."""
    import lightning as L

    from genlight import ArithmeticTask, DPOModule, LMDataModule, tiny_llama

    module = DPOModule(net=lambda tokenizer: tiny_llama(tokenizer, hidden_size=32, num_layers=1, num_heads=2,
                                                        intermediate_size=64), tokenizer=tokenizer)
    data = LMDataModule(ArithmeticTask(n_train=32, n_val=8, n_test=8), tokenizer, kind="preference", batch_size=8)
    kw = dict(accelerator="cpu", max_steps=2, logger=False, enable_progress_bar=False, enable_model_summary=False,
              limit_val_batches=0, default_root_dir=tmp_path, enable_checkpointing=False)
    first = L.Trainer(**kw)
    first.fit(module, data)
    ckpt = tmp_path / "done.ckpt"
    first.save_checkpoint(ckpt)
    L.Trainer(**kw).fit(module, data, ckpt_path=ckpt, weights_only=True)
    assert not any(m.training for m in module.ref_model.modules())
    assert all(m.training for m in module.model.modules())
