"""reasoning-gym as data and verifier: seeded disjoint splits mixed by weight, the entry carried with each row (into
worker processes and DDP ranks), the generator's own scorer with partial credit and exceptions handled, the junk
probe that refuses a reward hole, and bad input."""

from __future__ import annotations

import pickle

import pytest

from genlight.datamodules.reasoning_gym import ReasoningGymScore, ReasoningGymTask, Reference

CHAIN = {"name": "chain_sum", "config": {"min_terms": 2, "max_terms": 2, "min_digits": 1, "max_digits": 2}}
RG_RUN = ["data=reasoning_gym", "reward=reasoning_gym", "algo=rlvr", "warm_start.max_steps=0", "data.batch_size=4",
          "data.eval_batch_size=16", "algo.num_generations=2", "algo.max_new_tokens=4", "algo.val_num_samples=2",
          "trainer.val_check_interval=2", "trainer.max_steps=2", "test=false", "logger=csv"]


def test_splits_are_seeded_disjoint_and_mixed_by_weight():
    task = ReasoningGymTask([CHAIN, {"name": "gcd", "weight": 3}], n_train=200, n_val=40, n_test=41, seed=5)
    questions = {s: [r["prompt"] for _, r in task.rows(s)] for s in ("train", "val", "test")}
    assert [len(q) for q in questions.values()] == [200, 40, 41]
    flat = sum(questions.values(), [])
    assert len(set(flat)) == len(flat), "a question in two splits (or twice in one)"
    counts = {s: sum(r["answer"].task[0] == "gcd" for _, r in task.rows(s)) for s in questions}
    assert counts == {"train": 150, "val": 30, "test": 31}  # 3:1 by weight, largest remainder
    for _, row in task.rows("val"):
        assert row["completion"] == str(row["answer"]) == str(row["answer"].entry["answer"])
        assert row["prompt"] == row["answer"].entry["question"]
    again = ReasoningGymTask([CHAIN, {"name": "gcd", "weight": 3}], n_train=200, n_val=40, n_test=41, seed=5)
    assert [r["prompt"] for _, r in again.rows("test")] == questions["test"]
    other = ReasoningGymTask([CHAIN, {"name": "gcd", "weight": 3}], n_train=200, n_val=40, n_test=41, seed=6)
    assert [r["prompt"] for _, r in other.rows("test")] != questions["test"]


def test_a_curriculum_level_sets_the_generators_difficulty():
    easy = ReasoningGymTask({"name": "chain_sum", "level": 0}, n_train=50, n_val=0, n_test=0)
    hard = ReasoningGymTask({"name": "chain_sum", "level": 3}, n_train=50, n_val=0, n_test=0)
    terms = lambda t: max(r["answer"].entry["metadata"]["num_terms"] for _, r in t.rows("train"))  # noqa: E731
    assert terms(easy) == 2 and terms(hard) > 2


def test_the_reference_carries_its_entry_through_pickling_and_a_worker_loader(tokenizer):
    from genlight.datamodules.lm import LMDataModule

    ref = ReasoningGymTask(CHAIN, n_train=8, n_val=4, n_test=0).rows("train")[0][1]["answer"]
    back = pickle.loads(pickle.dumps(ref))
    assert isinstance(back, Reference) and back.entry == ref.entry and back.task == ref.task and back == ref
    dm = LMDataModule(ReasoningGymTask(CHAIN, n_train=8, n_val=4, n_test=0), tokenizer, kind="prompt", batch_size=4,
                      max_length=160, num_workers=1)
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))  # collated in a worker process
    v = ReasoningGymScore()
    assert all(isinstance(r, Reference) for r in batch["references"])
    assert [v(str(r), r) for r in batch["references"]] == [1.0] * 4


def test_the_scorer_its_partial_credit_its_exceptions_and_bad_scores(caplog, monkeypatch):
    refs = [r["answer"] for _, r in ReasoningGymTask("spell_backward", n_train=40, n_val=0, n_test=0).rows("train")]
    partial = ReasoningGymScore(partial_credit=True)
    spell = next(r for r in refs if 0 < partial("yes", r) < 1)  # the scorer's similarity credit for a wrong word
    assert ReasoningGymScore()(str(spell), spell) == 1.0
    assert ReasoningGymScore()("yes", spell) == 0.0  # full credit or nothing
    assert ReasoningGymScore(answer_tag="answer")(f"I think <answer>{spell}</answer>", spell) == 1.0
    primes = ReasoningGymTask("prime_factorization", n_train=5, n_val=0, n_test=0).rows("train")[0][1]["answer"]
    v = ReasoningGymScore()
    assert v("yes", primes) == 0.0 and "prime_factorization: score_answer raised ValueError" in caplog.text
    for bad in (1.5, float("nan"), "1", None):
        monkeypatch.setattr(v, "scorer", lambda ref, bad=bad: lambda answer, entry: bad)
        with pytest.raises(ValueError, match=rf"reasoning-gym spell_backward: score_answer returned {bad!r} for 'x': a "
                                             r"score must be a number in \[0, 1\]"):
            v("x", spell)
    monkeypatch.setattr(v, "scorer", lambda ref: lambda answer, entry: True)
    assert v("x", spell) == 1.0
    with pytest.raises(ValueError, match="only data=reasoning_gym's rows carry"):
        ReasoningGymScore()("1", "1")


def test_the_junk_probe_stops_a_task_that_pays_junk(tokenizer, monkeypatch):
    from genlight.datamodules.lm import LMDataModule

    dm = LMDataModule(ReasoningGymTask(CHAIN, n_train=32, n_val=4, n_test=0), tokenizer, kind="prompt", max_length=160)
    dm.setup("fit")
    ReasoningGymScore().check_references(dm.examples["train"], "train")  # full credit only: no hole
    # the scorer pays len(answer) / len(completion) to a completion that contains the answer
    with pytest.raises(ValueError, match=r"reasoning-gym task 'chain_sum' pays 0.\d+ to the junk answer '.*a reward "
                                         r"hole the policy would learn to exploit; .* or set reward.partial_credit=false"):
        ReasoningGymScore(partial_credit=True).check_references(dm.examples["train"], "train")
    leaky = ReasoningGymScore()
    monkeypatch.setattr(leaky, "raw_score", lambda answer, ref: float(answer == "yes" or answer == str(ref)))
    with pytest.raises(ValueError, match=r"'chain_sum' pays 1 to the junk answer 'yes' \(reasoning_gym:chain_sum:train"):
        leaky.check_references(dm.examples["train"], "train")


@pytest.mark.parametrize("tasks, message", [
    (["chain_sum", "no_such_task"], r"data.source.tasks\[1\]: unknown reasoning-gym task 'no_such_task'; the "
                                    r"available ones: .*basic_arithmetic.*chain_sum"),
    ([{"name": "gcd", "config": {"max_terms": 3}}], r"gcd has no option\(s\) \['max_terms'\]; its options: \[.*'max_value'"),
    ([{"name": "gcd", "weight": 0}], r"data.source.tasks\[0\].weight=0: must be a number > 0"),
    ([{"task": "gcd"}], r"data.source.tasks\[0\]=.*a task is a generator name or \{name, weight, config, level\}"),
    ([], "data.source.tasks is empty"),
])
def test_bad_tasks_stop_naming_what_is_wrong(tasks, message):
    with pytest.raises(ValueError, match=message):
        ReasoningGymTask(tasks, n_train=4, n_val=0, n_test=0)


def test_too_few_distinct_questions_and_preference_pairs_are_refused():
    tiny = {"name": "chain_sum", "config": {"min_terms": 2, "max_terms": 2, "min_digits": 1, "max_digits": 1}}
    with pytest.raises(ValueError, match=r"chain_sum .* has only \d+ distinct questions in \d+ draws, fewer than the "
                                         r"1000 its splits need"):
        ReasoningGymTask(tiny, n_train=1000, n_val=0, n_test=0)
    from genlight.datamodules.files import DataError

    with pytest.raises(DataError, match="no rejected answer to pair with"):
        ReasoningGymTask(CHAIN, n_train=4, n_val=0, n_test=0).preference_rows("train")


def test_rlvr_on_reasoning_gym_scores_with_the_generators_entry(cfg_factory):
    """data=reasoning_gym + reward=reasoning_gym through the pipeline: chat-templated prompts, the junk probe passes,
    pass@k is computed with the entries (a lost entry raises)."""
    from genlight.utils import get_metric_value
    from tests.helpers import answer_engine_callback, train_with

    cfg = cfg_factory(*RG_RUN)
    metrics, objs = train_with(cfg, answer_engine_callback())
    # held out, each prompt's even samples are its reference and the odd ones junk: the generators' own scorers,
    # reading each row's entry, give exactly pass@1 0.5 and pass@2 1.0
    assert get_metric_value(metrics, "val/pass@1") == 0.5 and get_metric_value(metrics, "val/pass@2") == 1.0
    dm = objs["datamodule"]
    example = dm.examples["val"][0]
    question = example["reference"].entry["question"]
    assert example["prompt"] == dm.tokenizer.apply_chat_template([{"role": "user", "content": question}],
                                                                 add_generation_prompt=True, tokenize=False)


def test_rlvr_on_reasoning_gym_under_ddp_scores_each_ranks_rows(cfg_factory):
    """trainer=ddp (2 processes, ddp_fork): each rank scores its own rows with their entries (an entry lost on the
    way to a rank raises in the verifier); the val rows scored over both ranks are the whole val split, once each."""
    import lightning as L

    from tests.helpers import train_with

    class Seen(L.Callback):
        def on_validation_batch_end(self, trainer, module, outputs, batch, batch_idx, dataloader_idx=0):
            assert all(isinstance(r, Reference) for r in batch["references"])
            module.log("ddp/val_rows", float(len(batch["references"])), reduce_fx="sum", sync_dist=True,
                       on_step=False, on_epoch=True, batch_size=1)
            module.log("ddp/world", float(trainer.world_size), on_step=False, on_epoch=True, batch_size=1)

    from tests.helpers import answer_engine_callback

    cfg = cfg_factory(*RG_RUN, "trainer=ddp", "trainer.strategy=ddp_fork", "logger=none", "data.source.n_val=16")
    metrics, _ = train_with(cfg, Seen(), answer_engine_callback())
    assert metrics["ddp/world"] == 2 and metrics["val/pass@1"] == 0.5 and metrics["val/pass@2"] == 1.0
    assert metrics["ddp/val_rows"] == 16


@pytest.mark.parametrize("preset", ["rg_arithmetic", "rg_spell_backward"])
def test_the_learning_presets_fit_their_budgets_and_pay_only_the_answer(cfg_factory, preset):
    """experiment=rg_* (the README's learning table): every prompt fits data.max_length, every answer (and its EOS)
    fits algo.max_new_tokens, so pass@1 is not capped by a cut; the scorer pays each reference 1 and a near miss 0."""
    import hydra

    cfg = cfg_factory(f"experiment={preset}", quick=False)
    tok = hydra.utils.instantiate(cfg.model.tokenizer)
    dm = hydra.utils.instantiate(cfg.data, tokenizer=tok)
    dm.setup("fit")  # truncation=error: a prompt over max_length raises here
    verifier = hydra.utils.instantiate(cfg.reward)
    for split in ("train", "val"):
        rows = dm.examples[split]
        assert len(rows) == cfg.data.source[f"n_{split}"]
        longest = max(len(tok(str(r["reference"]), add_special_tokens=False).input_ids) + 1 for r in rows)
        assert longest <= cfg.algo.max_new_tokens, f"{split}: an answer of {longest - 1} tokens + EOS"
        for r in rows[:50]:
            ref = r["reference"]
            assert verifier(str(ref), ref) == 1.0
            assert verifier(str(ref)[:-1] + ("0" if str(ref)[-1] != "0" else "1"), ref) == 0.0
