"""KTO (algo=kto): the loss against TRL 1.16's KTOTrainer on the same log-probs and against the formula by hand, the
unpaired rows (built-in and from files) and their bad input, the warm start that never imitates an undesirable
completion, and the default recipe learning on the arithmetic task."""

from __future__ import annotations

import json
import math
from collections import defaultdict
from types import SimpleNamespace

import pytest
import torch

from genlight.datamodules.files import DataError
from genlight.lightning_modules.kto import kl_reference_point, kto_loss
from tests.conftest import write_jsonl
from tests.helpers import train_with

QUICK_KTO = ["algo=kto", "warm_start.max_steps=0", "data.batch_size=8"]


# ------------------------------------------------------------------------------------------- the loss
def test_kto_loss_equals_the_formula_by_hand():
    """lambda_D (1 - sigma(beta (r - z0))) for desirable rows, lambda_U (1 - sigma(beta (z0 - r))) for undesirable."""
    pol, ref = torch.tensor([-3.0, -5.0, -2.0]), torch.tensor([-3.5, -4.0, -2.5])
    labels = torch.tensor([True, False, False])
    z0 = kl_reference_point(torch.tensor([-4.0, -6.0, -1.0]), torch.tensor([-4.2, -6.1, -1.3]))
    assert z0.item() == pytest.approx((0.2 + 0.1 + 0.3) / 3)
    losses, rewards = kto_loss(pol, ref, labels, z0, beta=0.5, desirable_weight=1.5, undesirable_weight=0.7)
    sig = lambda v: 1 / (1 + math.exp(-v))  # noqa: E731
    z = z0.item()
    want = [1.5 * (1 - sig(0.5 * (0.5 - z))), 0.7 * (1 - sig(0.5 * (z + 1.0))), 0.7 * (1 - sig(0.5 * (z - 0.5)))]
    assert losses.tolist() == pytest.approx(want, rel=1e-6)
    assert rewards.tolist() == pytest.approx([0.25, -0.5, 0.25])


class _Outputs(SimpleNamespace):
    pass


class _PrescribedLM(torch.nn.Module):
    """Stands in for the model inside TRL's `_compute_loss`: per-token log-probs chosen by the test (each row's sum
    is its given sequence log-prob), for the matched rows and the KL rows (told apart by their input ids)."""

    def __init__(self, input_ids, logps, kl_input_ids, kl_logps):
        super().__init__()
        self.rows = {"main": (input_ids, logps), "kl": (kl_input_ids, kl_logps)}

    def forward(self, input_ids, labels=None, **kwargs):
        ids, seq = next(v for v in self.rows.values() if v[0].shape == input_ids.shape and torch.equal(v[0], input_ids))
        per_token = torch.zeros(input_ids.size(0), input_ids.size(1) - 1)
        per_token[:, 0] = seq  # the row's sum is its sequence log-prob
        return _Outputs(log_probs=per_token, entropy=torch.zeros_like(per_token), mean_logits=torch.zeros_like(per_token))


def _trl_kto_loss(policy, ref, labels, kl_policy, kl_ref, beta, wd, wu) -> float:
    """TRL 1.16's `KTOTrainer._compute_loss` (its own code, not a copy) on these sequence log-probs, with precomputed
    reference log-probs; the trainer object carries just the attributes that method reads."""
    from trl.trainer.kto_trainer import KTOTrainer

    b = policy.numel()
    ids = torch.arange(b * 4).view(b, 4) + 10  # distinct rows for the matched and the KL sequences
    kl_ids = ids + 100
    trainer = object.__new__(KTOTrainer)
    model = _PrescribedLM(ids, policy, kl_ids, kl_policy)
    accelerator = SimpleNamespace(device=torch.device("cpu"), gather_for_metrics=lambda x: x)
    vars(trainer).update(accelerator=accelerator, beta=beta, loss_type="kto", desirable_weight=wd,
                         undesirable_weight=wu, calculate_KL=True, precompute_ref_logps=True, aux_loss_enabled=False,
                         _metrics={"train": defaultdict(list), "eval": defaultdict(list)}, model=model,
                         _total_train_tokens=0, _tp_size=1)
    ones = torch.ones_like(ids)
    batch = {"input_ids": ids, "attention_mask": ones, "completion_mask": ones, "KL_input_ids": kl_ids,
             "KL_attention_mask": ones, "KL_completion_mask": ones, "label": labels, "ref_logps": ref,
             "ref_KL_logps": kl_ref}
    return float(trainer._compute_loss(model, batch, return_outputs=False))


@pytest.mark.parametrize("beta, wd, wu", [(0.1, 1.0, 1.0), (0.5, 1.33, 0.8)])
def test_kto_loss_equals_trls(beta, wd, wu):
    """The mean of `kto_loss` with z_0 = max(0, `kl_reference_point`) is TRL 1.16's KTO loss on the same log-probs,
    with the reference point positive and clamped at 0."""
    torch.manual_seed(0)
    policy, ref = -torch.rand(6) * 8, -torch.rand(6) * 8
    labels = torch.tensor([True, False, True, True, False, False])
    for shift in (1.0, -1.0):  # z_0 > 0, and a negative estimate TRL clamps to 0
        kl_policy, kl_ref = -torch.rand(6) * 8, -torch.rand(6) * 8
        kl_policy = kl_ref + shift * (kl_policy - kl_ref).abs()
        z0 = kl_reference_point(kl_policy, kl_ref).clamp(min=0)
        ours = kto_loss(policy, ref, labels, z0, beta, wd, wu)[0].mean().item()
        assert ours == pytest.approx(_trl_kto_loss(policy, ref, labels, kl_policy, kl_ref, beta, wd, wu), rel=1e-6)
        assert (z0 > 0) == (shift > 0)


# ------------------------------------------------------------------------------------------- the rows
def test_builtin_rows_are_unpaired_pairs_and_each_batch_holds_mismatched_completions(cfg_factory):
    """The arithmetic task gives each pair as a desirable (correct) and an undesirable (corrupted) row of the same
    prompt; a batch's KL completions are its completions cycled by the fewest rows that pair no prompt with its own
    completion (one, TRL's cycling, when the prompts differ)."""
    import hydra

    cfg = cfg_factory(*QUICK_KTO)
    tok = hydra.utils.instantiate(cfg.model.tokenizer)
    dm = hydra.utils.instantiate(cfg.data, tokenizer=tok)
    dm.setup("fit")
    train = dm.examples["train"]
    assert len(train) == 2 * cfg.data.source.n_train
    assert sum(e["label"] for e in train) == cfg.data.source.n_train
    for good, bad in zip(train[::2], train[1::2]):
        assert good["label"] and not bad["label"] and good["prompt"] == bad["prompt"]
        assert good["completion_ids"] != bad["completion_ids"] and good["reference"] == bad["reference"]
    # rows in the task's order (each prompt's two rows side by side, as an unshuffled val split): shifted by two, so
    # no row's KL completion answers its own prompt; rows of distinct prompts: by one, TRL's cycling
    for rows, k in ((train[:5], 2), (train[0:10:2], 1)):
        batch = dm.collate(rows)
        for i in range(5):
            kl = batch["kl_completion_ids"][i][batch["kl_completion_mask"][i].bool()].tolist()
            assert kl == batch["completion_ids"][i - k][batch["completion_mask"][i - k].bool()].tolist()
            assert rows[i]["prompt"] != rows[i - k]["prompt"]
        assert batch["labels"].tolist() == [e["label"] for e in rows]
    from genlight.lightning_modules.kto import mismatch_shift

    assert mismatch_shift([[1], [1], [1]]) == 1  # one prompt: nothing to mismatch, TRL's by one
    assert mismatch_shift([[1], [2], [1], [2]]) == 1 and mismatch_shift([[1], [1], [2], [2], [3]]) == 2


@pytest.mark.parametrize("rows, message", [
    ([{"prompt": "1+1=", "completion": "2", "label": "yes"}, {"prompt": "1+2=", "completion": "4", "label": False}],
     r"unpaired.jsonl:1: 'label' must be true \(desirable\) or false \(undesirable\), got 'yes'"),
    ([{"prompt": "1+1=", "completion": "2"}, {"prompt": "1+2=", "completion": "4", "label": False}],
     r"unpaired.jsonl:1: 'label' must be true"),
    ([{"prompt": f"{i}+1=", "completion": str(i + 1), "label": True} for i in range(6)],
     r"unpaired.jsonl: every row of the train split is desirable \(label true\): KTO learns from both"),
    ([{"prompt": f"{i}+1=", "completion": str(i + 2), "label": False} for i in range(6)],
     r"every row of the train split is undesirable"),
    ([{"prompt": "1+1=", "chosen": "2", "rejected": "3"}, {"prompt": "1+2=", "completion": "4", "label": False}],
     r"unpaired.jsonl:1: a preference pair \({chosen, rejected}\): algo=kto reads unpaired rows"),
])
def test_bad_unpaired_rows_stop_naming_the_file_and_line(cfg_factory, tmp_path, rows, message):
    import hydra

    path = write_jsonl(tmp_path / "unpaired.jsonl", rows)
    cfg = cfg_factory(*QUICK_KTO, "data=jsonl_unpaired", f"data.source.train={path}", f"data.source.val={path}",
                      quick=False)
    dm = hydra.utils.instantiate(cfg.data, tokenizer=hydra.utils.instantiate(cfg.model.tokenizer))
    with pytest.raises(DataError, match=message):
        dm.setup("fit")


def _unpaired_file(tmp_path, n=24):
    rows = [{"prompt": f"{i}+1=", "completion": str(i + 1) if i % 2 == 0 else str(i + 7), "label": i % 2 == 0}
            for i in range(n)]
    rows[3] = {"prompt": [{"role": "user", "content": "3+1"}], "completion": [{"role": "assistant", "content": "10"}],
               "label": False}
    return write_jsonl(tmp_path / "unpaired.jsonl", rows)


def test_the_warm_start_never_trains_on_undesirable_rows_and_sft_refuses_them(cfg_factory, tmp_path):
    """KTO's warm start reads its data as DESIRABLE rows: only label-true completions (a chat row included); plain SFT
    on the same file stops at the first undesirable row, naming it."""
    import hydra

    path = _unpaired_file(tmp_path)
    cfg = cfg_factory(*QUICK_KTO, "data=jsonl_unpaired", f"data.source.train={path}", f"data.source.val={path}",
                      quick=False)
    tok = hydra.utils.instantiate(cfg.model.tokenizer)
    dm = hydra.utils.instantiate(cfg.data, tokenizer=tok, kind=cfg.warm_start.kind)
    dm.setup("fit")
    seen = {tok.decode(e["completion_ids"], skip_special_tokens=True) for e in dm.examples["train"]}
    assert seen == {str(i + 1) for i in range(0, 24, 2)}  # every desirable completion, no undesirable one
    sft = hydra.utils.instantiate(cfg.data, tokenizer=tok, kind="sft")
    with pytest.raises(DataError, match=r"unpaired.jsonl:2: 'label' is False: an undesirable completion"):
        sft.setup("fit")


def test_kto_trains_on_a_file_with_lora_and_refuses_packing(cfg_factory, tmp_path):
    """A JSONL file of unpaired rows trains end to end with LoRA adapters (only they move; the reference is the base
    model with adapters off, so the first step's rewards are 0), and data.packing=true stops before any work."""
    from genlight.pipeline import train

    path = _unpaired_file(tmp_path, 48)
    run = [*QUICK_KTO, "data=jsonl_unpaired", f"data.source.train={path}", "data.source.val_fraction=0.25",
           "trainer.max_steps=3",
           "trainer.val_check_interval=3", "logger=none", "trainer.accelerator=cpu", "extras.print_config=false",
           "test=false", "model.lora.r=4", "model.lora.dropout=0.0"]
    before = {}

    class Snapshot(__import__("lightning").Callback):
        def on_train_start(self, trainer, module):
            before.update({k: v.detach().clone() for k, v in module.model.named_parameters()})

    metrics, objs = train_with(cfg_factory(*run, quick=False), Snapshot())
    moved = {k for k, v in objs["module"].model.named_parameters() if not torch.equal(v, before[k])}
    assert moved and all("lora_" in k for k in moved)
    assert {"val/rewards/auroc", "val/kl", "val/rewards/chosen", "val/rewards/rejected"} <= set(metrics)
    with pytest.raises(ValueError, match="data.packing=true: KTO scores each row"):
        train(cfg_factory(*run, "+data.packing=true", quick=False))


def _one_label_val(tmp_path, label: bool):
    """A train file of both labels and a val file of `label` rows only."""
    train = _unpaired_file(tmp_path, 32)
    val = write_jsonl(tmp_path / "one_label_val.jsonl",
                      [{"prompt": f"{i}+1=", "completion": str(i + 1 if label else i + 7), "label": label}
                       for i in range(40, 52)])
    return train, val


@pytest.mark.parametrize("label", [True, False], ids=["desirable_only", "undesirable_only"])
def test_a_one_label_val_split_logs_only_what_is_defined_and_says_why_once(cfg_factory, tmp_path, caplog, label):
    """On a val split of one label the AUROC is undefined (torchmetrics gives 0.0 for one class: the worst score, so a
    sweep ranked such a run last) and so are the other label's means and the margin (NaN, a mean over no rows), and
    without desirable rows greedy exact match (0.0 over no rows): none is logged, every logged value is finite, and a
    warning names them once over two validations."""
    import logging

    train, val = _one_label_val(tmp_path, label)
    run = [*QUICK_KTO, "data=jsonl_unpaired", f"data.source.train={train}", f"data.source.val={val}",
           "optimized_metric=val/loss", "monitor_mode=min", "trainer.max_steps=4", "trainer.val_check_interval=2",
           "logger=none", "trainer.accelerator=cpu", "extras.print_config=false", "test=false"]
    with caplog.at_level(logging.WARNING, logger="genlight.lightning_modules.kto"):
        metrics, _ = train_with(cfg_factory(*run, quick=False))
    val_metrics = {k: float(v) for k, v in metrics.items() if k.startswith("val/")}
    kept, gone = ("chosen", "rejected") if label else ("rejected", "chosen")
    undefined = {f"val/rewards/{gone}", f"val/logps/{gone}", "val/rewards/margins", "val/rewards/auroc"}
    undefined |= set() if label else {"val/exact_match"}
    assert not undefined & set(val_metrics), val_metrics
    assert {"val/loss", "val/kl", f"val/rewards/{kept}", f"val/logps/{kept}"} <= set(val_metrics)
    assert all(math.isfinite(v) for v in val_metrics.values()), val_metrics
    said = [r.getMessage() for r in caplog.records if "every row of the val split" in r.getMessage()]
    assert len(said) == 1 and all(k in said[0] for k in undefined), said


@pytest.mark.parametrize("metric", ["val/rewards/auroc", "val/rewards/margins"])
def test_an_optimized_metric_a_one_label_val_split_leaves_undefined_is_refused_before_work(cfg_factory, tmp_path,
                                                                                         metric):
    """KTO's optimized_metric (val/rewards/auroc) on a val split of desirable rows only: the run and the Optuna sweep
    stop before the warm start, naming the metric, the split and its file, and suggesting another metric."""
    from genlight.lightning_modules.kto import KTOModule
    from genlight.pipeline import train

    train_file, val = _one_label_val(tmp_path, True)
    run = ["algo=kto", "data=jsonl_unpaired", f"data.source.train={train_file}", f"data.source.val={val}",
           "warm_start.max_steps=20", "warm_start.val_every=10", "data.batch_size=8", "trainer.max_steps=2",
           "trainer.val_check_interval=2", "logger=none", "trainer.accelerator=cpu", "extras.print_config=false",
           "test=false", f"optimized_metric={metric}"]
    message = (rf"optimized_metric={metric}: every row of the val split \(.*one_label_val.jsonl, 12 rows\) is "
               r"desirable \(label true\).*set another optimized_metric \(val/exact_match")
    with pytest.raises(ValueError, match=message):
        train(cfg_factory(*run, quick=False))
    assert not (tmp_path / "sft_init").exists(), "the warm start ran before the refusal"
    sweep = cfg_factory("hparams_search=kto_optuna", *run[:4], quick=False)
    assert sweep.optimized_metric == "val/rewards/auroc"
    with pytest.raises(ValueError, match=r"optimized_metric=val/rewards/auroc: every row of the val split"):
        KTOModule.check_config(sweep)
    KTOModule.check_config(cfg_factory(*run, "optimized_metric=val/exact_match", quick=False))  # defined: accepted


@pytest.mark.parametrize("lora", [[], ["model.lora.r=4", "model.lora.dropout=0.0"]], ids=["full", "lora"])
def test_first_step_rewards_are_zero_policy_equals_reference(cfg_factory, lora):
    """At the first step the policy is its reference (pi_0 = pi_ref: a frozen copy, or with LoRA the base with the
    adapters off), so every row's implied reward beta (log pi - log pi_ref) is exactly 0, and so is z_0; each row's
    loss is then lambda (1 - sigma(0)) = 0.5: read from the module's own forward inside the first training step."""
    seen = []

    class Record(__import__("lightning").Callback):
        def on_train_start(self, trainer, module):
            forward = module.forward

            def recorded(batch):
                loss, out = forward(batch)
                seen.append((loss.detach(), out))
                return loss, out

            module.forward = recorded

    train_with(cfg_factory(*QUICK_KTO, "data.batch_size=32", "trainer.max_steps=3", "trainer.val_check_interval=3",
                           "test=false", *lora), Record())
    loss, out = seen[0]
    assert out["labels"].any() and (~out["labels"]).any()
    assert torch.equal(out["rewards"], torch.zeros_like(out["rewards"])), out["rewards"]
    assert out["kl"].item() == 0.0 and loss.item() == 0.5
    # the warm-up's first learning rate is 0 (transformers' linear warm-up), so the policy first moves at step 2
    third = seen[2][1]["rewards"]
    assert not torch.equal(third, torch.zeros_like(third)), "the policy never moved: the check is vacuous"


def _validate(module, datamodule) -> dict:
    import lightning as L

    trainer = L.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False)
    return trainer.validate(module, datamodule=datamodule, verbose=False)[0]


@pytest.mark.slow
def test_kto_default_recipe_learns_without_losing_exact_match(cfg_factory, tmp_path):
    """`algo=kto` as shipped on the embedded default (warm start to greedy exact match 0.85 on the correct answers,
    then KTO on correct = desirable, corrupted = undesirable), 100 of its 400 steps, scored on the held-out rows at the
    start and at the end. At the start (the warm start, pi = pi_ref) every implied reward is 0, so the AUROC is
    exactly 0.5, and exact match is in the warm start's band; after 100 steps the AUROC exceeds 0.8 (measured 0.827)
    and exact match is not lower by more than 0.02 (measured 0.880 -> 0.920)."""
    from functools import partial

    from genlight.models import from_pretrained
    from genlight.pipeline import train

    metrics, objs = train(cfg_factory("algo=kto", "logger=none", "trainer.max_steps=100",
                                      "trainer.val_check_interval=100", "test=false", "trainer.accelerator=cpu",
                                      "extras.print_config=false", "trainer.enable_progress_bar=false", quick=False))
    module = objs["module"]
    start = _validate(type(module)(net=partial(from_pretrained, path=str(tmp_path / "sft_init")),
                                   tokenizer=module.tokenizer, **module.hparams), objs["datamodule"])
    assert start["val/rewards/auroc"] == 0.5 and start["val/rewards/margins"] == 0.0, start
    assert 0.8 <= start["val/exact_match"] <= 0.99, f"the warm start is off: exact match {start['val/exact_match']:.3f}"
    assert float(metrics["val/rewards/auroc"]) > 0.8, metrics
    assert float(metrics["val/exact_match"]) >= start["val/exact_match"] - 0.02, (start, metrics)


def test_unpaired_json_lines_roundtrip_through_datasets(cfg_factory, tmp_path):
    """The same rows saved as a `datasets` directory load as the JSONL file does (labels kept as booleans)."""
    import datasets
    import hydra

    path = _unpaired_file(tmp_path)
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    rows = [r for r in rows if isinstance(r["prompt"], str)]
    disk = tmp_path / "unpaired_ds"
    datasets.Dataset.from_list(rows).save_to_disk(str(disk))
    cfg = cfg_factory(*QUICK_KTO, "data=jsonl_unpaired", f"data.source.train={disk}", f"data.source.val={disk}",
                      quick=False)
    dm = hydra.utils.instantiate(cfg.data, tokenizer=hydra.utils.instantiate(cfg.model.tokenizer))
    dm.setup("fit")
    assert [e["label"] for e in dm.examples["train"]] == [r["label"] for r in rows]


def test_exact_match_over_no_desirable_rows_is_not_logged_without_a_datamodule(cfg_factory, tmp_path):
    """`trainer.validate(module, dataloaders=...)` (no DataModule to tell the split's labels): on a split of
    undesirable rows only, exact match would be 0.0 over no rows; it is decided from the split's summed label counts
    at the epoch's end, not logged; on a split with desirable rows it is (the greedy exact match of those rows)."""
    import lightning as L

    from genlight.pipeline import build

    for label in (False, True):
        train, val = _one_label_val(tmp_path, label)
        cfg = cfg_factory(*QUICK_KTO, "data=jsonl_unpaired", f"data.source.train={train}", f"data.source.val={val}",
                          "optimized_metric=val/loss", "monitor_mode=min", "logger=none", "trainer.accelerator=cpu",
                          quick=False)
        objs = build(cfg, warm_start=False)
        dm = objs["datamodule"]
        dm.setup("fit")
        trainer = L.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False)
        out = trainer.validate(objs["module"], dataloaders=dm.val_dataloader(), verbose=False)[0]
        assert ("val/exact_match" in out) == label, out
