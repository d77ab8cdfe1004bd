"""RLHF: the Bradley-Terry reward model (algo=reward_model), RL against it (reward=model), and the KL to the
reference, whose options reach the closed-form optimum pi_ref exp(r / beta) / Z on a bandit (or, k3 in the loss,
the forward KL's fixed point)."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F

from genlight.lightning_modules.reward_model import bradley_terry_loss
from genlight.rl.advantages import compute_advantages, kl_penalised_rewards, zero_variance
from genlight.rl.loss import kl_term, rlvr_loss
from genlight.rl.rollouts import score_samples
from tests.helpers import attach_trainer, train_with

RM_QUICK = ["algo=reward_model", "warm_start.max_steps=0", "trainer.max_steps=4"]


# ------------------------------------------------------------------------------------------- the loss
def test_bradley_terry_loss_equals_the_formula():
    r_w, r_l = torch.tensor([1.0, -0.5, 2.0]), torch.tensor([0.0, 0.5, 2.5])
    m = torch.tensor([0.5, 0.0, 1.0])
    by_hand = sum(math.log(1 + math.exp(-(a - b - c))) for a, b, c in zip(r_w.tolist(), r_l.tolist(), m.tolist())) / 3
    assert bradley_terry_loss(r_w, r_l, m).item() == pytest.approx(by_hand, rel=1e-6)
    center = sum((a + b) ** 2 for a, b in zip(r_w.tolist(), r_l.tolist())) / 3
    assert bradley_terry_loss(r_w, r_l, m, 0.01).item() == pytest.approx(by_hand + 0.01 * center, rel=1e-6)
    assert bradley_terry_loss(r_w, r_l).item() == pytest.approx(-F.logsigmoid(r_w - r_l).mean().item(), rel=1e-6)


@pytest.mark.filterwarnings("ignore:You are trying to `self.log\\(\\)` but the `self.trainer` reference")
def test_reward_model_step_uses_the_rows_margins(cfg_factory, tmp_path):
    """A JSONL pair's `margin` reaches the loss: the module's loss on a batch equals the formula with those
    margins (and differs from the one without); a margin that is not a number stops naming its line."""
    import hydra

    from genlight.datamodules.files import DataError

    rows = [{"prompt": f"{i}+1=", "chosen": str(i + 1), "rejected": str(i + 2), "margin": float(i % 3)} for i in range(8)]
    path = tmp_path / "pairs.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = cfg_factory(*RM_QUICK, "data=jsonl_pref", f"data.source.train={path}", "data.source.val_fraction=0.25",
                      "logger=none", quick=False)
    tok = hydra.utils.instantiate(cfg.model.tokenizer)
    dm = hydra.utils.instantiate(cfg.data, tokenizer=tok)
    dm.setup("fit")
    module = hydra.utils.instantiate(cfg.algo, net=hydra.utils.instantiate(cfg.model.net), tokenizer=tok, _convert_="all")
    batch = dm.collate(dm.examples["train"])
    kept = [e["margin"] for split in ("train", "val") for e in dm.examples[split]]
    assert sorted(kept) == sorted(r["margin"] for r in rows)  # every row's margin, none lost
    r_w, r_l = module(batch)
    expected = bradley_terry_loss(r_w, r_l, batch["margins"], cfg.algo.center_rewards_coefficient)
    assert module._step(batch, "train")[0].item() == pytest.approx(expected.item(), rel=1e-6)
    assert batch["margins"].abs().sum() > 0
    assert expected.item() != pytest.approx(bradley_terry_loss(r_w, r_l, None, cfg.algo.center_rewards_coefficient).item())

    path.write_text(json.dumps(rows[0]) + "\n" + json.dumps({**rows[1], "margin": "big"}) + "\n")
    dm = hydra.utils.instantiate(cfg.data, tokenizer=tok)
    with pytest.raises(DataError, match=r"pairs.jsonl:2: 'margin' must be a finite number"):
        dm.setup("fit")


# ------------------------------------------------------------------------------------------- the reward model
@pytest.fixture(scope="module")
def reward_model_dir(tmp_path_factory):
    """A reward model trained a few steps and exported (hf/), as algo=reward_model writes it."""
    from tests.conftest import make_cfg

    tmp = tmp_path_factory.mktemp("reward_model")
    _, objects = train_with(make_cfg(tmp, [*RM_QUICK, "test=false"]))
    return tmp / "hf", objects


def test_reward_model_export_loads_and_scores_text_as_the_module(reward_model_dir):
    """The export is an ordinary `AutoModelForSequenceClassification` (one output). `reward=model` re-tokenises
    text with the export's tokenizer: its scores of the val pairs' text equal the trained module's on the
    datamodule's token ids, for chosen and rejected."""
    from transformers import AutoModelForSequenceClassification

    from genlight.rewards import RewardModel

    path, objects = reward_model_dir
    model = AutoModelForSequenceClassification.from_pretrained(path, local_files_only=True)
    assert model.config.num_labels == 1 and type(model).__name__ == "LlamaForSequenceClassification"
    module, dm = objects["module"], objects["datamodule"]
    batch = dm.collate(dm.examples["val"][:8])
    r_w, r_l = module.eval()(batch)
    examples = dm.examples["val"][:8]
    tok = module.tokenizer
    chosen = [tok.decode(e["chosen_ids"], skip_special_tokens=True) for e in examples]
    rejected = [tok.decode(e["rejected_ids"], skip_special_tokens=True) for e in examples]
    rm = RewardModel(str(path))
    prompts = [e["prompt"] for e in examples]
    torch.testing.assert_close(rm.raw_scores(prompts, chosen), r_w, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(rm.raw_scores(prompts, rejected), r_l, rtol=1e-4, atol=1e-5)
    assert not torch.allclose(r_w, r_l)


def test_reward_model_normalize_whitens_with_running_statistics(reward_model_dir):
    """normalize: (r - mean) / std over every training score so far (Chan's parallel update equals the
    statistics of all scores at once); evaluation does not move them; verifier_weight adds the verifier."""
    from genlight.rewards import RewardModel

    path, _ = reward_model_dir
    rm = RewardModel(str(path), normalize=True)
    prompts, completions = ["12+30=", "5+5=", "40+2="] * 3, ["42", "10", "7", "43", "11", "42", "1", "10", "42"]
    raw = rm.raw_scores(prompts, completions)
    rm.score_batch(prompts[:4], completions[:4], ["42"] * 4, update=True)
    out = rm.score_batch(prompts[4:], completions[4:], ["42"] * 5, update=True)
    torch.testing.assert_close(out, (raw[4:] - raw.mean()) / (raw.std() + 1e-6), rtol=1e-4, atol=1e-5)
    before = rm.stats.clone()
    rm.score_batch(prompts, completions, ["42"] * 9, update=False)
    assert torch.equal(rm.stats, before)
    mixed = RewardModel(str(path), verifier_weight=2.0).score_batch(prompts, completions, ["42"] * 9)
    torch.testing.assert_close(mixed - raw, 2.0 * torch.tensor([float(c == "42") for c in completions]))


def test_rlvr_against_a_reward_model(cfg_factory, reward_model_dir, tmp_path):
    """reward=model: RL steps score samples with the frozen reward model (train/reward/mean is its score), the
    verifier judges train/pass_rate and val/pass@1, the reward model's weights never change and are in the
    checkpoint."""
    path, _ = reward_model_dir
    cfg = cfg_factory("experiment=rlhf", f"reward.pretrained={path}", "warm_start.max_steps=0", "trainer.max_steps=2",
                      "trainer.val_check_interval=2", "algo.num_generations=4", "algo.val_num_samples=2",
                      "data.batch_size=4", "algo.max_new_tokens=4", "callbacks.model_checkpoint.dirpath=" + str(tmp_path / "ck"))
    from transformers import AutoModelForSequenceClassification

    start = AutoModelForSequenceClassification.from_pretrained(path, local_files_only=True).state_dict()
    import lightning as L

    scored = []  # (the reward model's scores, truncated) of each training step's samples

    class RecordScores(L.Callback):
        def on_train_start(self, trainer, module):
            score_batch = module.reward.score_batch

            def recording(*args, **kwargs):
                out = score_batch(*args, **kwargs)
                if trainer.training:
                    scored.append((out.detach().clone(), kwargs["truncated"].detach().clone()))
                return out

            module.reward.score_batch = recording

    metrics, objects = train_with(cfg, RecordScores())
    module = objects["module"]
    for k, v in module.reward.model.state_dict().items():
        assert torch.equal(v, start[k]), k
    assert not any(p.requires_grad for p in module.reward.parameters())
    assert module.reward.stats[0] == 2 * 4 * 4  # every training score entered the running statistics
    ckpt = torch.load(next((tmp_path / "ck").glob("last*.ckpt")), weights_only=True)
    assert any(k.startswith("reward.model.") for k in ckpt["state_dict"]) and "reward.stats" in ckpt["state_dict"]
    # train/reward/mean is the reward model's (whitened) score of the step's samples, a cut sample at the step's
    # lowest (truncated_reward=min), before the KL penalty folded into the advantages (kl_in=reward)
    assert len(scored) == 2
    r, cut = scored[-1]
    want = torch.where(cut, r.min(), r).mean()
    assert float(metrics["train/reward/mean"]) == pytest.approx(float(want), abs=1e-6)


def test_rlhf_bad_input_stops_before_work(cfg_factory, tmp_path):
    import hydra
    from hydra.errors import InstantiationException

    from genlight.utils import check_required

    cfg = cfg_factory("experiment=rlhf")
    with pytest.raises(Exception, match="reward.pretrained"):
        check_required(cfg)
    cfg = cfg_factory("experiment=rlhf", f"reward.pretrained={tmp_path / 'nope'}")
    with pytest.raises(InstantiationException, match="reward.pretrained=.*nope.* is not a directory"):
        hydra.utils.instantiate(cfg.algo.reward)


@pytest.mark.parametrize("overrides, message", [
    (["algo.kl_in=reward", "algo.kl_estimator=k3"], "algo.kl_in=reward folds k1"),
    (["algo.kl_in=loss", "algo.kl_estimator=k1"], "algo.kl_estimator=k1 as a loss term"),
    (["algo.kl_estimator=k4"], "algo.kl_estimator='k4'"),
    (["algo.kl_in=advantage"], "algo.kl_in='advantage'"),
])
def test_kl_options_are_checked(cfg_factory, overrides, message):
    import hydra
    from hydra.errors import InstantiationException

    cfg = cfg_factory("algo=rlvr", "algo.beta=0.1", *overrides)
    tok = hydra.utils.instantiate(cfg.model.tokenizer)
    with pytest.raises(InstantiationException, match=message):
        hydra.utils.instantiate(cfg.algo, net=hydra.utils.instantiate(cfg.model.net), tokenizer=tok, _convert_="all")


# ------------------------------------------------------------------------------------------- KL on a bandit
R = torch.tensor([1.0, 0.6, 0.2, 0.0, -0.4])  # the reward of each of K = 5 answers
REF = torch.softmax(torch.tensor([0.5, -0.3, 0.8, 0.0, -1.0]), 0)  # pi_ref
BETA, B, G = 0.5, 8, 64


def reverse_kl_optimum(beta: float) -> torch.Tensor:
    """argmax E_pi[r] - beta KL[pi || pi_ref] = pi_ref exp(r / beta) / Z (the lecture's closed form)."""
    p = REF * torch.exp(R / beta)
    return p / p.sum()


def forward_kl_optimum(beta: float) -> torch.Tensor:
    """argmax E_pi[r] - beta KL[pi_ref || pi]: r_i + beta pi_ref_i / pi_i = lambda, i.e. pi_i = beta pi_ref_i /
    (lambda - r_i) with lambda > max r such that sum pi = 1 (bisection)."""
    lo, hi = R.max().item() + 1e-12, R.max().item() + 100.0
    for _ in range(200):
        lam = (lo + hi) / 2
        lo, hi = (lam, hi) if (beta * REF / (lam - R)).sum() > 1 else (lo, lam)
    p = beta * REF / (lam - R)
    return p / p.sum()


def train_bandit(kl_estimator: str, kl_in: str, lag: int = 4, steps: int = 3000, seed: int = 0) -> torch.Tensor:
    """A tabular softmax policy trained with this project's loss (CISPO, token aggregation, group advantages
    without normalisation) on samples of a pi_gen refreshed every `lag` steps (importance weights); the mean
    policy over the last quarter of the steps."""
    gen = torch.Generator().manual_seed(seed)
    theta = torch.zeros(len(R), requires_grad=True)
    opt = torch.optim.Adam([theta], lr=0.05)
    decay = torch.optim.lr_scheduler.LambdaLR(opt, lambda t: min(1.0, 2.0 * (1 - t / steps)))
    mean, n, theta_gen = torch.zeros(len(R)), 0, theta.detach().clone()
    for t in range(steps):
        if t % lag == 0:
            theta_gen = theta.detach().clone()
        p_gen = torch.softmax(theta_gen, 0)
        y = torch.multinomial(p_gen, B * G, replacement=True, generator=gen).view(B, G, 1)
        logp, logp_gen, ref = torch.log_softmax(theta, 0)[y], p_gen.log()[y], REF.log()[y]
        mask = torch.ones_like(y, dtype=torch.bool)
        r = R[y].squeeze(-1)
        if kl_in == "reward":
            r = kl_penalised_rewards(r, logp_gen, ref, mask, BETA)
        loss, _ = rlvr_loss(logp, logp_gen, compute_advantages("dr_grpo", r), mask, loss_type="cispo",
                            loss_agg="token", ref_logp=ref, beta=BETA, with_stats=False, kl_estimator=kl_estimator,
                            kl_in=kl_in)
        opt.zero_grad()
        loss.backward()
        opt.step()
        decay.step()
        if t >= 3 * steps // 4:
            mean, n = mean + torch.softmax(theta.detach(), 0), n + 1
    return mean / n


def tv(p: torch.Tensor, q: torch.Tensor) -> float:
    return 0.5 * (p - q).abs().sum().item()


@pytest.mark.parametrize("kl_estimator, kl_in, optimum", [
    ("k1", "reward", "reverse"),  # r - beta log pi/pi_ref: the advantage is exactly 0 at the optimum
    ("k2", "loss", "reverse"),    # d^2 / 2: the reverse KL's gradient
    ("k3", "loss", "forward"),    # TRL GRPO's / DeepSeekMath's: the forward KL's fixed point
])
def test_kl_options_reach_their_closed_form_on_a_bandit(kl_estimator, kl_in, optimum):
    """Each option converges to its fixed point within 0.002 in total variation, and not to the other's (0.035
    apart here). With the KL in the loss the reward's gradient carries the group-mean baseline's factor
    (G - 1) / G (each sample's own reward is in its group's mean), so the fixed point is that of beta G / (G - 1);
    in the reward the penalised advantage vanishes at the optimum, whatever its scale."""
    beta = BETA if kl_in == "reward" else BETA * G / (G - 1)
    target, other = (reverse_kl_optimum, forward_kl_optimum) if optimum == "reverse" else (forward_kl_optimum, reverse_kl_optimum)
    pi = train_bandit(kl_estimator, kl_in)
    assert tv(pi, target(beta)) < 2e-3, (pi, target(beta))
    assert tv(pi, other(beta)) > 2e-2


def test_kl_estimators_estimate_the_reverse_kl():
    """On samples of pi, k1 and k3 are unbiased estimates of KL[pi || pi_ref] (train/kl logs k3's); k2 = d^2 / 2 is
    biased (15% here): it is chosen for its gradient as a loss term, not for its value."""
    pi = torch.softmax(torch.tensor([0.2, -0.1, 0.4, 0.0, -0.3]), 0)
    exact = (pi * (pi / REF).log()).sum()
    d = (pi / REF).log()
    for est in ("k1", "k3"):
        assert (pi * kl_term(d, est)).sum().item() == pytest.approx(exact.item(), rel=1e-5)
    assert (pi * kl_term(d, "k2")).sum().item() == pytest.approx(exact.item(), rel=0.2)
    assert (pi * kl_term(d, "k2")).sum().item() != pytest.approx(exact.item(), rel=0.05)


@pytest.mark.slow
def test_reward_model_default_recipe_reaches_090_heldout_accuracy(cfg_factory, shared_warm_start):
    """`algo=reward_model` as shipped on the embedded default (warm start to greedy exact match 0.85, then the
    Bradley-Terry loss on the arithmetic pairs), 400 of its 600 steps: held-out pair accuracy >= 0.9 on val and
    test (measured in the 600-step run: 0.92 at step 200, 0.95 at 400; a 250-step run, its cosine decay shorter,
    ended at 0.888). Its warm start is DPO's learning test's (`shared_warm_start`: trained once, by whichever runs
    first)."""
    cfg = cfg_factory("algo=reward_model", "trainer.max_steps=400", "trainer.val_check_interval=400", "logger=none",
                      "trainer.enable_progress_bar=false", *shared_warm_start, quick=False)
    metrics, _ = train_with(cfg)
    assert float(metrics["val/accuracy"]) >= 0.9, metrics["val/accuracy"]
    assert float(metrics["test/accuracy"]) >= 0.9, metrics["test/accuracy"]


def test_reward_model_with_lora_trains_adapters_and_its_new_score_head(cfg_factory, tmp_path):
    """model.lora.r: peft's SEQ_CLS task trains the adapters and the (new) score head in full, the base weights
    stay frozen; the export has the adapters merged and scores exactly as the trained module."""
    from transformers import AutoModelForSequenceClassification

    from genlight.lightning_modules.reward_model import sequence_rewards

    cfg = cfg_factory(*RM_QUICK, "model.lora.r=4", "model.lora.dropout=0.0", "algo.lr=1e-2", "test=false")
    _, objects = train_with(cfg)
    module, dm = objects["module"], objects["datamodule"]
    trainable = {n for n, p in module.model.named_parameters() if p.requires_grad}
    assert any("lora_" in n for n in trainable) and any(".score." in n for n in trainable)
    assert not any("base_layer" in n or "embed_tokens" in n for n in trainable)
    exported = AutoModelForSequenceClassification.from_pretrained(tmp_path / "hf", local_files_only=True)
    batch = dm.collate(dm.examples["val"][:8])
    module.eval()
    r_module = torch.cat(module(batch))
    torch.testing.assert_close(sequence_rewards(exported, batch["input_ids"], batch["attention_mask"]), r_module,
                               rtol=1e-4, atol=1e-5)
    assert r_module.std() > 0


def test_rlvr_against_a_reward_model_under_ddp_whitens_with_every_process_scores(cfg_factory, reward_model_dir):
    """Under DDP (2 processes, ddp_fork) `reward.normalize` pools its running statistics over both processes: after
    2 steps both hold the count of all 2 x 2 x 4 x 4 scores and the same mean and M2."""
    import lightning as L

    class StatsCheck(L.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            s = pl_module.all_gather(pl_module.reward.stats.float())  # (world, 3)
            pl_module.log("ddp/world", float(s.size(0)), batch_size=1, on_step=False, on_epoch=True, reduce_fx="max")
            pl_module.log("ddp/stats_spread", (s.max(0).values - s.min(0).values).abs().max(), batch_size=1,
                          on_step=False, on_epoch=True, reduce_fx="max")
            pl_module.log("ddp/count", s[0, 0], batch_size=1, on_step=False, on_epoch=True, reduce_fx="max")

    path, _ = reward_model_dir
    cfg = cfg_factory("experiment=rlhf", f"reward.pretrained={path}", "warm_start.max_steps=0", "trainer.max_steps=2",
                      "trainer.val_check_interval=2", "algo.num_generations=4", "algo.val_num_samples=2",
                      "data.batch_size=4", "algo.max_new_tokens=4", "trainer=ddp", "trainer.strategy=ddp_fork",
                      "trainer.accelerator=cpu", "test=false")
    metrics, _ = train_with(cfg, StatsCheck())
    assert metrics["ddp/world"] == 2 and metrics["ddp/count"] == 2 * 2 * 4 * 4
    assert metrics["ddp/stats_spread"] == 0


def test_best_of_k_by_the_reward_model(cfg_factory, reward_model_dir, tmp_path):
    """eval.scorer=reward_model: best-of-k picks the sample the reward model scores highest. With an oracle in the
    reward model's place (it scores a sample 1 when the verifier accepts it) best-of-n equals pass@n, with its
    negation it is lower;
    the trained reward model runs through eval.py; without eval.reward_model the run stops, naming the key. The
    verifier is the tests' parity one, which accepts some completions of any model."""
    from genlight.pipeline import evaluate, train
    from genlight.rewards import FunctionReward
    from genlight.test_time import curves_at_k
    from tests.helpers import parity_reward

    path, _ = reward_model_dir
    train(cfg_factory("algo=sft", "test=false", "trainer.max_steps=4"))
    run = ["algo=sft", f"ckpt_path={tmp_path / 'checkpoints' / 'last.ckpt'}", "eval.num_samples=4"]
    _, objs = evaluate(cfg_factory(*run, name="eval"))
    batch = next(iter(objs["datamodule"].test_dataloader()))
    answers = dict(zip(batch["prompts"], batch["references"]))

    class Oracle:
        def __init__(self, sign: float):
            self.sign = sign

        def raw_scores(self, prompts, completions):
            return self.sign * torch.tensor([parity_reward(c, answers[p]) for p, c in zip(prompts, completions)])

    verifier = FunctionReward(parity_reward)
    objs["module"].hparams["truncated_reward"] = None  # the oracle sees text only: judge truncated samples as they are
    best = curves_at_k(objs["module"], [batch], 4, 1.0, verifier, "reward_model", reward_model=Oracle(1.0))
    worst = curves_at_k(objs["module"], [batch], 4, 1.0, verifier, "reward_model", reward_model=Oracle(-1.0))
    assert worst["pass"] == best["pass"] and 0 < best["pass"][0] < best["pass"][-1] < 1  # the same samples
    assert best["best"][-1] == pytest.approx(best["pass"][-1])  # the oracle finds a correct sample when one exists
    assert worst["best"][-1] < best["best"][-1]  # ... the anti-oracle only when all are
    cfg = cfg_factory(*run, "eval.scorer=reward_model", f"eval.reward_model={path}", name="eval")
    metrics, objs = evaluate(cfg)
    # eval.py's curves are curves_at_k's (whose best-of-k the oracles above pin) with the reward model it was given,
    # the checkpoint's own verifier and the run's seed
    from genlight.rewards import RewardModel

    want = curves_at_k(objs["module"], objs["datamodule"].test_dataloader(), 4, 1.0, None, "reward_model",
                       max_batch_size=cfg.eval.max_batch_size, seed=cfg.seed, reward_model=RewardModel(str(path)))
    for k in (1, 2, 3, 4):
        assert metrics[f"test/ttc/best_of@{k}"] == pytest.approx(want["best"][k - 1])
        assert metrics[f"test/ttc/pass@{k}"] == pytest.approx(want["pass"][k - 1])
    assert want["best"] != want["pass"] or want["pass"][0] in (0.0, 1.0)  # the scorer picks among different samples
    with pytest.raises(ValueError, match="eval.scorer=reward_model needs eval.reward_model"):
        evaluate(cfg_factory(*run, "eval.scorer=reward_model", name="eval"))


def test_rlhf_option_errors_stop_before_the_warm_start(cfg_factory, reward_model_dir, tmp_path):
    """train.py checks the algorithm's config first: a wrong KL option, retirement with a reward model or a missing
    reward model directory stops before the warm start trains (it would write <run>/sft_init)."""
    from genlight.pipeline import build

    path, _ = reward_model_dir
    for overrides, error, message in [
        (["algo=rlvr", "algo.beta=0.1", "algo.kl_in=reward", "algo.kl_estimator=k2"], ValueError, "kl_in=reward folds"),
        (["experiment=rlhf", f"reward.pretrained={path}", "algo.retire_threshold=0.9"], ValueError,
         "retire_threshold=0.9 retires prompts"),
        (["experiment=rlhf", f"reward.pretrained={tmp_path / 'nope'}"], FileNotFoundError, "is not a directory"),
    ]:
        cfg = cfg_factory(*overrides, "warm_start.max_steps=2", "warm_start.val_every=1")
        with pytest.raises(error, match=message):
            build(cfg)
        assert not (tmp_path / "sft_init").exists(), overrides


# ------------------------------------------------------------------------------------------- review fixes (issue 27)
def test_a_reward_model_export_reloads_as_a_classifier_with_its_trained_head(cfg_factory, tmp_path):
    """`model=hf model.pretrained=<reward model hf/>` loads the directory as its config's architecture (a sequence
    classifier, trained score head included): eval.py on the export scores what the training run's test did, and
    what `AutoModelForSequenceClassification` gives on the same text; a causal-LM algorithm refuses it."""
    import hydra
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from genlight.pipeline import evaluate, train

    run = [*RM_QUICK, "trainer.val_check_interval=4"]  # one validation: the best checkpoint is the final weights
    trained, _ = train(cfg_factory(*run))
    export = tmp_path / "hf"
    scored, objs = evaluate(cfg_factory("algo=reward_model", "model=hf", f"model.pretrained={export}", name="eval"))
    keys = [k for k in trained if k.startswith("test/")]
    assert "test/accuracy" in keys and sorted(keys) == sorted(scored)
    for k in keys:
        assert scored[k] == pytest.approx(float(trained[k]), rel=1e-5, abs=1e-6), k
    hf = AutoModelForSequenceClassification.from_pretrained(export).eval()
    tok = AutoTokenizer.from_pretrained(export)
    ids = torch.tensor([tok("12+3=15")["input_ids"], tok("12+3=16")["input_ids"]])
    with torch.no_grad():
        want = hf(input_ids=ids).logits[:, 0]
        got = objs["module"].model(input_ids=ids).logits[:, 0]
    assert torch.allclose(got, want, atol=1e-5) and not torch.allclose(want, torch.zeros(2), atol=1e-3)
    cfg = cfg_factory("algo=sft", "model=hf", f"model.pretrained={export}")
    with pytest.raises(Exception, match="sequence classifier.*not a causal LM"):
        hydra.utils.instantiate(cfg.algo, net=hydra.utils.instantiate(cfg.model.net),
                                tokenizer=hydra.utils.instantiate(cfg.model.tokenizer), _convert_="all")


def test_truncation_reward_is_in_raw_units_before_whitening(reward_model_dir):
    """reward.normalize with algo.truncated_reward = 0.0: the truncated sample scores 0 in the model's raw units, then
    whitened with statistics of the model's own scores; it never lands at the running mean (0 after whitening, above
    every sample below average). Raw [1, 2, 3, 4] with the first truncated: statistics of [2, 3, 4] (mean 3, std 1),
    so the rewards are [-3, -1, 0, 1]; its verifier part is 0."""
    from genlight.rewards import RewardModel

    path, _ = reward_model_dir
    rm = RewardModel(str(path), normalize=True)
    rm.raw_scores = lambda prompts, completions: torch.tensor([1.0, 2.0, 3.0, 4.0])
    cut = torch.tensor([True, False, False, False])
    r = rm.score_batch(["p"] * 4, ["a", "b", "c", "d"], ["d"] * 4, update=True, truncated=cut, truncated_reward=0.0)
    assert r.tolist() == pytest.approx([-3.0, -1.0, 0.0, 1.0], abs=1e-5)
    assert rm.stats.tolist() == pytest.approx([3.0, 3.0, 2.0])  # n, mean, M2 of the model's scores only
    mixed = RewardModel(str(path), verifier_weight=1.0)
    mixed.raw_scores = rm.raw_scores
    r = mixed.score_batch(["p"] * 4, ["d", "b", "c", "d"], ["d"] * 4, truncated=cut, truncated_reward=0.0)
    assert r.tolist() == pytest.approx([0.0, 2.0, 3.0, 5.0])  # the truncated "d" gets no verifier credit


def test_rlhf_truncated_completions_score_the_steps_minimum(cfg_factory, reward_model_dir):
    """experiment=rlhf (whitened reward model) sets algo.truncated_reward=min: a truncated completion scores the
    lowest reward of the step, whatever the reward model's scale, and never passes."""
    from genlight.pipeline import build

    path, _ = reward_model_dir
    cfg = cfg_factory("experiment=rlhf", f"reward.pretrained={path}", "warm_start.max_steps=0")
    assert cfg.algo.truncated_reward == "min"
    module = attach_trainer(build(cfg, warm_start=False)["module"]).train()
    module.reward.raw_scores = lambda prompts, completions: torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0, 6.0])
    cut = torch.tensor([True, False, False, False, False, True])
    r, passed, _ = score_samples(module, ["1+1="] * 3, ["2"] * 3, ["2", "2", "4", "5", "6", "2"], cut)
    assert r[0] == r[5] == r.min() and (r[0] < r[1:5]).all()
    assert passed.tolist() == [False, True, False, False, False, False]  # the exact verifier: "2" passes if it ended


def test_a_reward_model_with_verifier_weight_calls_the_verifier_once_per_sample(cfg_factory, reward_model_dir):
    """reward=model with verifier_weight: the module scores each sample with the verifier once, and the model's
    reward adds verifier_weight x that same score (a verifier raising on every second call would show a double
    call as an error or a different reward)."""
    from genlight.pipeline import build

    path, _ = reward_model_dir
    cfg = cfg_factory("experiment=rlhf", f"reward.pretrained={path}", "reward.verifier_weight=2.0",
                      "algo.truncated_reward=null", "warm_start.max_steps=0")
    module = attach_trainer(build(cfg, warm_start=False)["module"])
    calls = []
    exact = module.reward.verifier

    def counting(completion, answer):
        calls.append(completion)
        return exact(completion, answer)

    module.verifier = module.reward.verifier = counting
    module.reward.raw_scores = lambda prompts, completions: torch.zeros(len(completions))
    module.reward.normalize = False
    r, passed, _ = score_samples(module, ["1+1="] * 2, ["2"] * 2, ["2", "3", "2", "5"],
                                 torch.zeros(4, dtype=torch.bool))
    assert calls == ["2", "3", "2", "5"]  # once each (twice before: once for passes, once in score_batch)
    assert r.tolist() == [2.0, 0.0, 2.0, 0.0] and passed.tolist() == [True, False, True, False]


def test_rlvr_truncated_reward_and_sampling_options_are_checked(cfg_factory):
    """top_p < 1 (the trainer would score another distribution than the sampler's), temperature 0 and an unknown
    truncated_reward stop at construction, naming the key."""
    import hydra
    from hydra.errors import InstantiationException

    for override, message in (("algo.top_p=0.9", "algo.top_p=0.9: a nucleus sampler"),
                              ("algo.temperature=0", "algo.temperature=0"),
                              ("algo.truncated_reward=max", "algo.truncated_reward='max'")):
        cfg = cfg_factory("algo=rlvr", override)
        with pytest.raises(InstantiationException, match=message):
            hydra.utils.instantiate(cfg.algo, net=hydra.utils.instantiate(cfg.model.net),
                                    tokenizer=hydra.utils.instantiate(cfg.model.tokenizer), _convert_="all")


def test_zero_variance_filter_keeps_the_kl_term_of_tied_groups():
    """kl_in=loss: a group whose rewards tie loses its policy-gradient term (A = 0) to the filter, never its KL term:
    the KL gradient on its tokens is what it is on a kept group's (the issue's measurement: 0 on a filtered group)."""
    torch.manual_seed(0)
    logp = torch.randn(2, 4, 3).clamp(max=-0.1).requires_grad_(True)
    ref = torch.randn(2, 4, 3).clamp(max=-0.1)
    mask = torch.ones(2, 4, 3, dtype=torch.bool)
    r = torch.tensor([[1.0, 0.0, 1.0, 0.0], [1.0, 1.0, 1.0, 1.0]])  # the second group ties
    keep = ~zero_variance(r)
    adv = compute_advantages("dr_grpo", r, keep)
    loss, _ = rlvr_loss(logp, logp.detach(), adv, mask, keep, loss_type="cispo", loss_agg="token", ref_logp=ref, beta=0.1,
                        kl_estimator="k2", kl_in="loss")
    loss.backward()
    d = (logp - ref).detach()
    # the tied group's gradient is its KL term's alone: beta d / N per token (k2 = d^2 / 2), N = all 24 tokens
    assert torch.allclose(logp.grad[1], 0.1 * d[1] / 24, atol=1e-7)
    assert logp.grad[1].abs().sum() > 0


def test_entropy_bonus_is_the_coefficient_times_every_groups_entropy_tied_ones_included():
    """algo.entropy_coef: the loss is (-(reward term) - c sum_t H_t) / N over every group's tokens (token aggregation:
    N = 23 unmasked tokens, the tied group's included, as with the KL term; without the bonus N is the kept group's
    11), and a tied group gets the bonus's gradient alone."""
    from genlight.rl.recipe import Recipe

    torch.manual_seed(0)
    logp = torch.randn(2, 4, 3).clamp(max=-0.1).requires_grad_(True)
    ent = torch.rand(2, 4, 3).requires_grad_(True)
    mask = torch.ones(2, 4, 3, dtype=torch.bool)
    mask[0, 1, 2] = False  # a padded token: no bonus there
    r = torch.tensor([[1.0, 0.0, 1.0, 0.0], [1.0, 1.0, 1.0, 1.0]])  # the second group ties
    keep = ~zero_variance(r)
    adv = compute_advantages("dr_grpo", r, keep)
    kw = dict(loss_type="cispo", loss_agg="token")
    plain, _ = rlvr_loss(logp, logp.detach(), adv, mask, keep, **kw)
    bonus, _ = rlvr_loss(logp, logp.detach(), adv, mask, keep, entropy=ent, entropy_coef=0.05, **kw)
    n = 23  # every group's unmasked tokens
    # by hand: the plain loss averages the kept group's 11 tokens; with the bonus all 23 are the denominator
    assert bonus.item() == pytest.approx(plain.item() * 11 / n - 0.05 * ent[mask].sum().item() / n, rel=1e-6)
    bonus.backward()
    assert torch.allclose(ent.grad, -0.05 * mask.float() / n)
    assert torch.all(logp.grad[1] == 0)  # the tied group: no reward term
    with pytest.raises(ValueError, match="entropy_coef > 0 needs the entropy"):
        rlvr_loss(logp, logp.detach(), adv, mask, keep, entropy_coef=0.05, **kw)
    with pytest.raises(ValueError, match="algo.entropy_coef=-0.1: must be >= 0"):
        Recipe(entropy_coef=-0.1)


def test_zero_variance_is_judged_on_the_raw_rewards_with_kl_in_reward(cfg_factory):
    """kl_in=reward: the filter looks at the verifier's rewards, not the KL-penalised ones (which almost never tie):
    train/frac_zero_variance counts the raw ties, and a tied group stays in the loss with its KL part as advantage."""
    from genlight.pipeline import build

    cfg = cfg_factory("algo=rlvr", "algo.beta=0.1", "algo.kl_in=reward", "warm_start.max_steps=0")
    module = attach_trainer(build(cfg, warm_start=False)["module"])
    raw = torch.tensor([[1.0, 1.0, 1.0, 1.0], [1.0, 0.0, 0.0, 1.0]])
    penalised = raw - torch.tensor([[0.186, 0.151, 0.076, 0.185], [0.1, 0.2, 0.05, 0.0]])
    adv, keep, zv = module.advantages(penalised, raw)
    assert zv.tolist() == [True, False]  # the raw rewards of the first group tie
    assert keep.tolist() == [True, True]  # ... and its KL part still pulls toward pi_ref
    kl_part = penalised[0] - penalised[0].mean()
    assert torch.allclose(adv[0] / adv[0].norm(), kl_part / kl_part.norm(), atol=1e-5)


# ------------------------------------------------------------------------------------------- the filter on a bandit, module-level
DIGITS = set("0123456789")


def digit_reward(completion: str, answer: str) -> float:
    """1 for a one-character digit completion (the rewarded set of the module-level bandit)."""
    return float(completion in DIGITS and len(completion) == 1)



def _bandit_run(cfg_factory, tmp_path, zero_variance_filter: bool):
    """RLVRModule itself (sampling, rewards, the filter, the KL in the loss, the optimizer) on a one-prompt bandit:
    one new token from a tiny Llama, reward 1 for a digit (about a tenth of pi_ref's mass), G = 2 samples (half the
    groups tie), on-policy, k2 in the loss, advantages without normalisation. Returns the module and the policy's
    mean next-token distribution over the second half of the steps."""
    import lightning as L

    from tests.conftest import write_jsonl

    class Distribution(L.Callback):
        def __init__(self):
            self.seen = []

        def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
            with torch.no_grad():
                logits = module.model(input_ids=batch["prompt_input_ids"][:1]).logits[0, -1]
            self.seen.append(torch.softmax(logits.float(), -1))

    rows = write_jsonl(tmp_path / f"bandit_{zero_variance_filter}.jsonl", [{"prompt": "x", "answer": "0"}] * 8)
    record = Distribution()
    cfg = cfg_factory(
        "algo=rlvr", "data=jsonl_prompts", f"data.source.train={rows}", f"data.source.val={rows}", "reward=custom",
        "reward.fn._target_=tests.test_rlhf.digit_reward", "warm_start.max_steps=0", "test=false", "logger=none",
        "callbacks=none",
        "data.batch_size=8", "algo.num_generations=2", "algo.max_new_tokens=1", "algo.generation_lag=0",
        "algo.loss_agg=token", "algo.advantage=dr_grpo", f"algo.beta={BANDIT_BETA}", "algo.kl_estimator=k2",
        f"algo.zero_variance_filter={zero_variance_filter}", "algo.retire_threshold=null", "algo.truncated_reward=null",
        "algo.lr=1e-2", "algo.warmup_steps=0", "algo.weight_decay=0", "trainer.gradient_clip_val=null",
        "+trainer.limit_val_batches=0", "trainer.num_sanity_val_steps=0", "trainer.max_steps=300",
        "trainer.accelerator=cpu", "trainer.enable_progress_bar=false", "extras.print_config=false",
        "model.net.hidden_size=32", "model.net.num_layers=1", "model.net.num_heads=2", "model.net.intermediate_size=64",
        quick=False)
    _, objs = train_with(cfg, record)
    return objs["module"], torch.stack(record.seen[len(record.seen) // 2 :]).mean(0)


BANDIT_BETA = 0.5


def test_zero_variance_filter_keeps_the_kl_regularised_optimum_module_level(cfg_factory, tmp_path):
    """With the filter on, RLVRModule still reaches the KL-regularised optimum pi_ref exp(r / beta') / Z (beta' =
    beta G / (G - 1), the group-mean baseline's factor): the mass it puts on the rewarded digits is within 0.04 of the
    closed form's (0.224 here; 0.30 when tied groups lost their KL term), and it trains exactly as with the filter off
    (a tied group's policy-gradient term is 0: the filter removes nothing else)."""
    module, on = _bandit_run(cfg_factory, tmp_path, True)
    _, off = _bandit_run(cfg_factory, tmp_path, False)
    tok = module.tokenizer
    with torch.no_grad():
        ref = torch.softmax(module.ref_model(input_ids=torch.tensor([tok("x")["input_ids"]])).logits[0, -1], -1)
    reward = torch.tensor([digit_reward(tok.decode([v]), "0") for v in range(ref.numel())])
    g = 2
    star = ref * torch.exp(reward / (BANDIT_BETA * g / (g - 1)))
    star = star / star.sum()
    assert 0.05 < (ref * reward).sum() < 0.2 and star @ reward > 2 * (ref @ reward)  # a bandit the KL holds back
    assert abs(on @ reward - star @ reward) < 0.04, (float(on @ reward), float(star @ reward))
    assert torch.equal(on, off)
