"""DPO: each loss against a hand computation, the gradient's closed form, sequence log-probs,
the TR-DPO refresh rule and its resume, bad preference rows, and learning."""

from __future__ import annotations

import math

import lightning as L
import pytest
import torch

from genlight.datamodules.files import DataError, FileSource
from genlight.datamodules.lm import LMDataModule
from genlight.lightning_modules.dpo import DPOModule, dpo_loss, pair_logps, sequence_logps
from genlight.models import tiny_llama
from tests.conftest import write_jsonl
from tests.helpers import train_with

PC, PR = torch.tensor([-2.0, -5.0]), torch.tensor([-3.0, -1.0])  # policy chosen / rejected
RC, RR = torch.tensor([-2.5, -4.0]), torch.tensor([-2.5, -2.0])  # reference chosen / rejected
BETA = 0.1
H = [1.0, -2.0]  # (pc - rc) - (pr - rr), by hand


def logsig(x: float) -> float:
    return -math.log1p(math.exp(-x))


@pytest.mark.parametrize(
    "loss_type, kw, want",
    [
        ("sigmoid", {}, [-logsig(BETA * h) for h in H]),
        ("sigmoid", {"label_smoothing": 0.2}, [-0.8 * logsig(BETA * h) - 0.2 * logsig(-BETA * h) for h in H]),
        ("ipo", {}, [(h - 1 / (2 * BETA)) ** 2 for h in H]),  # 16, 49
        ("hinge", {}, [max(0.0, 1 - BETA * h) for h in H]),  # 0.9, 1.2
        ("naive_margin", {}, [-(-2.0 - -3.0), -(-5.0 - -1.0)]),  # -1, 4: no reference
        ("sft_chosen", {"chosen_lengths": torch.tensor([2.0, 5.0])}, [1.0, 1.0]),
    ],
)
def test_each_loss_matches_the_hand_computation(loss_type, kw, want):
    losses, r_w, r_l = dpo_loss(PC, PR, RC, RR, beta=BETA, loss_type=loss_type, **kw)
    assert torch.allclose(losses, torch.tensor(want), atol=1e-6), (losses, want)
    if loss_type in ("sigmoid", "ipo", "hinge"):
        assert torch.allclose(r_w, torch.tensor([0.05, -0.1])) and torch.allclose(r_l, torch.tensor([-0.05, 0.1]))


def test_unknown_loss_type():
    with pytest.raises(ValueError, match="algo.loss_type='kto'"):
        dpo_loss(PC, PR, RC, RR, loss_type="kto")


def test_sigmoid_gradient_matches_the_lecture_closed_form(tokenizer):
    """grad L = -beta sigma(r_l - r_w) [grad log pi(y_w) - grad log pi(y_l)], on a real model."""
    model = tiny_llama(tokenizer, hidden_size=16, num_layers=1, num_heads=2, intermediate_size=32, seed=3)
    ref = tiny_llama(tokenizer, hidden_size=16, num_layers=1, num_heads=2, intermediate_size=32, seed=4)
    dm = LMDataModule(_task(), tokenizer, kind="preference", batch_size=1)
    dm.setup()
    batch = next(iter(dm.train_dataloader()))
    params = list(model.parameters())

    def grads(scalar):
        return torch.cat([g.flatten() for g in torch.autograd.grad(scalar, params, allow_unused=False)])

    logps, _ = sequence_logps(model, batch["input_ids"], batch["attention_mask"], batch["labels"])
    with torch.no_grad():
        ref_logps, _ = sequence_logps(ref, batch["input_ids"], batch["attention_mask"], batch["labels"])
    (pc, pr), (rc, rr) = logps.chunk(2), ref_logps.chunk(2)
    loss = dpo_loss(pc, pr, rc, rr, beta=BETA)[0].sum()
    autograd = grads(loss)

    g_w = grads(sequence_logps(model, batch["input_ids"], batch["attention_mask"], batch["labels"])[0][0])
    g_l = grads(sequence_logps(model, batch["input_ids"], batch["attention_mask"], batch["labels"])[0][1])
    r_w, r_l = BETA * (pc - rc).item(), BETA * (pr - rr).item()
    closed = -BETA * (1 / (1 + math.exp(-(r_l - r_w)))) * (g_w - g_l)
    assert torch.allclose(autograd, closed, atol=1e-6, rtol=1e-4)


def _task():
    from genlight.datamodules.arithmetic import ArithmeticTask

    return ArithmeticTask(n_train=16, n_val=8, n_test=8, seed=5)


def test_sequence_logps_match_separate_unpadded_forward_passes(tokenizer):
    model = tiny_llama(tokenizer, hidden_size=32, num_layers=2, num_heads=2, intermediate_size=64, seed=1).eval()
    dm = LMDataModule(_task(), tokenizer, kind="preference", batch_size=8)
    dm.setup()
    batch = next(iter(dm.val_dataloader()))
    with torch.no_grad():
        logps, lengths = sequence_logps(model, batch["input_ids"], batch["attention_mask"], batch["labels"])
        shared, shared_lengths = pair_logps(model, batch)  # what DPOModule uses: one prompt pass per pair
        assert torch.equal(lengths, shared_lengths) and torch.allclose(logps, shared, atol=1e-5)
        for i, ex in enumerate(dm.examples["val"]):
            for j, key in enumerate(("chosen_ids", "rejected_ids")):
                ids = torch.tensor([ex["prompt_ids"] + ex[key]])
                logp = torch.log_softmax(model(ids).logits[0, :-1].double(), -1)
                targets = ids[0, 1:]
                direct = logp.gather(-1, targets[:, None])[len(ex["prompt_ids"]) - 1 :].sum()
                row = i + j * len(dm.examples["val"])  # chosen rows first, then rejected
                assert lengths[row] == len(ex[key])
                assert abs(logps[row].item() - direct.item()) < 1e-4


def test_preference_pairs_from_the_task_are_correct_vs_corrupted():
    task = _task()
    for _, row in task.preference_rows("train"):
        assert row["chosen"] == row["answer"] and row["rejected"] != row["answer"]
        assert row["rejected"].lstrip("-").isdigit()
    # the corruption is seeded: the same seed gives the same pairs, another seed other rejected answers
    same, other = task.preference_rows("val", seed=1), task.preference_rows("val", seed=2)
    assert same == task.preference_rows("val", seed=1)
    assert [r["chosen"] for _, r in other] == [r["chosen"] for _, r in same]
    assert sum(a["rejected"] != b["rejected"] for (_, a), (_, b) in zip(same, other)) > len(same) // 2


@pytest.mark.parametrize(
    "bad, message",
    [
        ({"prompt": "1+1=", "chosen": "2"}, "missing key 'rejected'"),
        ({"prompt": "1+1=", "chosen": "2", "rejected": "2"}, "'chosen' and 'rejected' are identical"),
        ({"prompt": "", "chosen": "2", "rejected": "3"}, "empty string for key 'prompt'"),
        ({"prompt": "1+1=", "chosen": " ", "rejected": "3"}, "empty string for key 'chosen'"),
    ],
)
def test_bad_preference_rows_name_file_and_line(tmp_path, tokenizer, bad, message):
    path = write_jsonl(tmp_path / "pref.jsonl", [{"prompt": "1+1=", "chosen": "2", "rejected": "3"}] * 2 + [bad])
    with pytest.raises(DataError, match=rf"{path}:3: {message}"):
        LMDataModule(FileSource(train=str(path), val=str(path)), tokenizer, kind="preference").setup()


def test_chat_preference_rows(tmp_path, tokenizer):
    row = {
        "prompt": [{"role": "user", "content": "2+2?"}],
        "chosen": [{"role": "assistant", "content": "4"}],
        "rejected": [{"role": "assistant", "content": "5"}],
    }
    path = write_jsonl(tmp_path / "pref.jsonl", [row] * 3)
    dm = LMDataModule(FileSource(train=str(path), val=str(path)), tokenizer, kind="preference")
    dm.setup()
    ex = dm.examples["val"][0]
    assert ex["prompt"].endswith("<|assistant|>") and tokenizer.decode(ex["chosen_ids"], skip_special_tokens=True) == "4"


# ----------------------------------------------------------------------------- reference refresh
def _dpo(tokenizer, **kw) -> DPOModule:
    net = lambda tokenizer: tiny_llama(tokenizer, hidden_size=16, num_layers=1, num_heads=2, intermediate_size=32)  # noqa: E731
    return DPOModule(net=net, tokenizer=tokenizer, **kw)


def test_reference_is_frozen_and_cached(tokenizer):
    module = _dpo(tokenizer)
    assert all(not p.requires_grad for p in module.ref_model.parameters())
    module.train()
    assert module.model.training and not module.ref_model.training
    dm = LMDataModule(_task(), tokenizer, kind="preference", batch_size=4)
    dm.setup()
    batch = next(iter(dm.train_dataloader()))
    first = module.reference_logps(batch, "train")
    calls = []
    module.ref_model.base_model.register_forward_hook(lambda *a: calls.append(1))
    again = module.reference_logps(batch, "train")
    assert not calls, "cached reference log-probs were recomputed"
    assert all(torch.allclose(a, b) for a, b in zip(first, again))
    module.refresh_reference(alpha=1.0)  # the reference changed: its cached values are stale
    module.reference_logps(batch, "train")
    assert calls, "the cache was not recomputed after a refresh"


def test_refresh_happens_exactly_at_multiples_of_tau_by_the_alpha_rule(tokenizer):
    from genlight.callbacks import ReferenceRefresh

    module = _dpo(tokenizer)
    cb = ReferenceRefresh(tau=3, alpha=0.25)
    module.log = lambda *a, **k: None

    class Trainer:
        global_step = 0

    trainer = Trainer()
    module._ref_cache[("train", 0)] = (0.0, 0.0)
    ref = [p.detach().clone() for p in module.ref_model.parameters()]
    for step in range(1, 8):
        with torch.no_grad():  # stand-in for an optimizer step
            for p in module.model.parameters():
                p.add_(0.01 * step)
        trainer.global_step = step
        before = [p.detach().clone() for p in module.ref_model.parameters()]
        cb.on_train_batch_start(trainer, module, None, step)
        after = list(module.ref_model.parameters())
        if step % 3 == 0:
            want = [0.25 * p + 0.75 * r for p, r in zip(module.model.parameters(), ref)]
            assert all(torch.allclose(a, w, atol=1e-6) for a, w in zip(after, want)), f"step {step}"
            assert not module._ref_cache, "cache not invalidated on refresh"
            ref = [p.detach().clone() for p in after]
        else:
            assert all(torch.equal(a, b) for a, b in zip(after, before)), f"reference changed at step {step}"
    assert cb.state_dict()["refreshes"] == 2
    # a repeated call at the same step (e.g. gradient accumulation) does not refresh twice
    cb.on_train_batch_start(trainer, module, None, 0)
    assert cb.refreshes == 2


class ValRecorder(L.Callback):
    """The val metrics at each validation, by optimizer step, and the steps at which the reference is refreshed."""

    def __init__(self):
        self.val, self.refreshed_at = {}, []

    def setup(self, trainer, pl_module, stage):
        refresh = pl_module.refresh_reference
        pl_module.refresh_reference = lambda alpha: (self.refreshed_at.append(trainer.global_step), refresh(alpha))

    def on_validation_end(self, trainer, pl_module):
        if not trainer.sanity_checking:
            self.val[trainer.global_step] = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("val/")}


def test_tr_dpo_validation_at_a_refresh_step_compares_with_the_reference_trained_against(cfg_factory):
    """tau = val_check_interval = 2: every validation falls on a refresh step. It must see the reference of the last
    tau steps (non-zero margins, loss != log 2), not a copy of the policy made just before it."""
    import math

    rec = ValRecorder()
    train_with(cfg_factory("algo=tr_dpo", "warm_start.max_steps=0", "callbacks.reference_refresh.tau=2",
                           "trainer.val_check_interval=2", "trainer.max_steps=6", "test=false"), rec)
    assert rec.refreshed_at == [2, 4], "refreshes at the start of the steps after steps 2 and 4"
    assert sorted(rec.val) == [2, 4, 6]
    for step, m in rec.val.items():
        assert abs(m["val/rewards/margins"]) > 1e-4, f"step {step}: margins 0: the reference equals the policy"
        assert abs(m["val/loss"] - math.log(2)) > 1e-5, f"step {step}"


def test_tr_dpo_tau_counts_optimizer_steps_under_gradient_accumulation(cfg_factory):
    """accumulate_grad_batches = 3: tau = 2 optimizer steps is 6 batches; one refresh per tau steps, never one per
    micro-batch, and the run takes max_steps optimizer steps."""
    rec = ValRecorder()
    metrics, objs = train_with(cfg_factory(
        "algo=tr_dpo", "warm_start.max_steps=0", "callbacks.reference_refresh.tau=2", "trainer.accumulate_grad_batches=3",
        "trainer.val_check_interval=6", "trainer.max_steps=5", "test=false", "data.batch_size=4"), rec)
    assert objs["trainer"].global_step == 5
    assert rec.refreshed_at == [2, 4]


def test_dpo_fast_dev_run_logs_trl_metric_names(cfg_factory):
    from genlight.pipeline import train

    metrics, _ = train(cfg_factory("algo=dpo", "warm_start.max_steps=2", "debug=fdr"))
    for k in ("rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins", "logps/chosen", "logps/rejected"):
        assert f"train/{k}" in metrics and f"test/{k}" in metrics
    assert "test/exact_match" in metrics


# ----------------------------------------------------------------------------- learning
@pytest.fixture(scope="module")
def dpo_run(tmp_path_factory, shared_warm_start):
    """algo=dpo on the embedded default: warm-start SFT (to exact match 0.85), then DPO."""
    from hydra.core.global_hydra import GlobalHydra

    from genlight.pipeline import train
    from tests.conftest import make_cfg

    tmp = tmp_path_factory.mktemp("dpo")
    cfg = make_cfg(tmp, DPO_LEARNING + shared_warm_start, quick=False)
    metrics, objs = train(cfg)
    GlobalHydra.instance().clear()
    return metrics, objs, tmp / "sft_init"


DPO_LEARNING = [
    "algo=dpo", "logger=none", "callbacks=none", "test=false", "extras.print_config=false",
    "trainer.enable_progress_bar=false", "trainer.val_check_interval=100",
    "data.source.n_val=256",
]


def _module_from(path, like):
    """A module like `like` whose policy (and so reference) is the checkpoint at `path`."""
    from functools import partial

    from genlight.models import from_pretrained

    return type(like)(net=partial(from_pretrained, path=str(path)), tokenizer=like.tokenizer, **like.hparams)


def _validate(module, datamodule) -> dict:
    import lightning as L

    trainer = L.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False)
    return trainer.validate(module, datamodule=datamodule, verbose=False)[0]


@pytest.mark.slow
def test_dpo_raises_heldout_reward_accuracy_without_hurting_exact_match(dpo_run):
    metrics, objs, sft_init = dpo_run
    assert (sft_init / "config.json").is_file()
    # the starting point: the warm-start SFT policy, scored on the same held-out pairs
    before = _validate(_module_from(sft_init, objs["module"]), objs["datamodule"])
    after = _validate(objs["module"], objs["datamodule"])
    assert before["val/rewards/accuracies"] == 0.0  # pi = pi_ref: no margin yet
    # the start first: the warm start trains to val exact match 0.85; a start outside the band is its failure
    assert 0.8 <= before["val/exact_match"] <= 0.99, f"the warm start is off: exact match {before['val/exact_match']:.3f}"
    assert after["val/rewards/accuracies"] > 0.9, after
    assert after["val/exact_match"] >= before["val/exact_match"] - 0.02, (before, after)


@pytest.mark.slow
def test_naive_margin_melts_down(dpo_run, cfg_factory):
    """The lecture's Idea 0: maximising log pi(y_w) - log pi(y_l) drives both log-probs down."""
    from genlight.pipeline import train

    _, objs, sft_init = dpo_run
    cfg = cfg_factory(*DPO_LEARNING, "algo.loss_type=naive_margin", "algo.lr=2e-4", "model=hf", f"model.pretrained={sft_init}",
                      "trainer.max_steps=150", "trainer.val_check_interval=150", quick=False)
    metrics, run = train(cfg)
    start = _validate(_module_from(sft_init, run["module"]), run["datamodule"])
    end = _validate(run["module"], run["datamodule"])
    assert end["val/logps/chosen"] < start["val/logps/chosen"] - 1.0, (start, end)
    assert end["val/logps/rejected"] < start["val/logps/rejected"] - 1.0, (start, end)


def test_ref_pretrained_sets_a_different_reference(cfg_factory, hf_dir):
    """model.ref_pretrained=DIR: the reference is that checkpoint, not a copy of the policy."""
    import hydra

    cfg = cfg_factory("algo=dpo", f"model.ref_pretrained={hf_dir}")
    tok = hydra.utils.instantiate(cfg.model.tokenizer)
    module = hydra.utils.instantiate(cfg.algo, net=hydra.utils.instantiate(cfg.model.net), tokenizer=tok)
    assert module.ref_model.config.hidden_size == 32 and module.model.config.hidden_size == 128
    assert all(not p.requires_grad for p in module.ref_model.parameters())


def test_wandb_run_holds_margin_histogram_and_reward_axes(cfg_factory, tmp_path):
    """Read back from the offline W&B run: the per-pair margins histogram at each validation, the TRL-named
    reward metrics, their step axis and max summary."""
    from genlight.pipeline import train
    from tests.helpers import leet as _leet

    train(cfg_factory("algo=dpo", "warm_start.max_steps=0", "logger=wandb", "test=false", "trainer.max_steps=4"))
    (run,) = list((tmp_path / "wandb").glob("offline-run-*"))
    records = _leet(run, summary=False)
    history = [r["history"]["item"] for r in records if r["type"] == "history"]
    hists = [h for h in history if h.get("val/rewards/margins_hist._type") == "histogram"]
    assert len(hists) == 2, "one histogram per validation (steps 2 and 4)"
    assert sum(hists[0]["val/rewards/margins_hist.values"]) == 16, "every held-out pair is counted"
    keys = set().union(*history)
    assert {"train/rewards/chosen", "train/rewards/margins", "val/rewards/accuracies", "train/logps/rejected"} <= keys
    named = {r["metric"]["name"]: r["metric"] for r in records if r["type"] == "metric" and "name" in r["metric"]}
    assert named["val/rewards/accuracies"]["summary"] == {"max": True}
