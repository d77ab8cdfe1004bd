"""RLVR (ScaleRL): the loss against hand computations, the stop-gradient, advantages, zero-variance
filtering, no-positive resampling across resume, the rollout engine, verifiers, pass@k and the
ScaleRL sigmoid fit."""

from __future__ import annotations

import json
import math
from itertools import combinations
from pathlib import Path

import numpy as np
import pytest
import torch

from genlight.metrics import PassAtK, majority_correct, pass_at_k
from genlight.models.logps import completion_logps
from genlight.rl.advantages import compute_advantages, zero_variance
from genlight.rl.loss import aggregate, rlvr_loss
from tests.helpers import RLVR_RUN as RUN
from tests.helpers import leet, train_with
from tests.helpers.trl import trl_grpo_loss

# --------------------------------------------------------------------------- fixed inputs
# B = 2 prompts, G = 2 samples, T = 3 tokens; sample lengths 3, 1 | 2, 3
MASK = torch.tensor([[[1, 1, 1], [1, 0, 0]], [[1, 1, 0], [1, 1, 1]]], dtype=torch.bool)
LOGP = torch.tensor([[[-0.5, -1.0, -0.2], [-2.0, 0.0, 0.0]], [[-0.1, -0.3, 0.0], [-1.5, -0.7, -0.4]]])
LOGP_GEN = torch.tensor([[[-0.6, -0.9, -2.5], [-1.0, 0.0, 0.0]], [[-0.1, -0.5, 0.0], [-1.4, -0.9, -0.3]]])
ADV = torch.tensor([[1.0, -1.0], [-0.5, 2.0]])


def _tokens():
    """(b, g, t) of every completion token."""
    return [(b, g, t) for b in range(2) for g in range(2) for t in range(3) if MASK[b, g, t]]


def _hand_objective(loss_type, eps=5.0, lo=0.2, hi=0.2):
    """Per-token objective by hand, one float at a time."""
    out = {}
    for b, g, t in _tokens():
        lp, lq, a = float(LOGP[b, g, t]), float(LOGP_GEN[b, g, t]), float(ADV[b, g])
        rho = math.exp(lp - lq)
        if loss_type == "cispo":
            out[b, g, t] = min(rho, eps) * a * lp
        else:
            out[b, g, t] = min(rho * a, min(max(rho, 1 - lo), 1 + hi) * a)
    return out


def _hand_aggregate(obj, how):
    if how == "token":
        return -sum(obj.values()) / len(obj)
    if how == "sequence":
        per = [sum(v for (b, g, _), v in obj.items() if (b, g) == (bb, gg)) / int(MASK[bb, gg].sum())
               for bb in range(2) for gg in range(2)]
        return -sum(per) / len(per)
    per = [sum(v for (b, _, _), v in obj.items() if b == bb) / int(MASK[bb].sum()) for bb in range(2)]
    return -sum(per) / len(per)


@pytest.mark.parametrize("loss_type,hi", [("cispo", None), ("grpo", 0.2), ("dapo", 0.28)])
@pytest.mark.parametrize("how", ["prompt", "token", "sequence"])
def test_loss_matches_hand_computation(loss_type, hi, how):
    loss, _ = rlvr_loss(LOGP, LOGP_GEN, ADV, MASK, loss_type=loss_type, loss_agg=how, epsilon=1.5,
                        clip_low=0.2, clip_high=hi or 0.2)
    want = _hand_aggregate(_hand_objective(loss_type, eps=1.5, hi=hi or 0.2), how)
    assert loss.item() == pytest.approx(want, rel=1e-5)


@pytest.mark.parametrize("lo,hi", [(0.2, 0.2), (3e-4, 4e-4), (10.0, 10.0)])
def test_gspo_loss_and_gradient_match_a_hand_computation_and_trls(lo, hi):
    """GSPO: one ratio per sequence, s = exp(mean_t log pi / pi_gen), clipped as PPO's, the mean over sequences.
    By hand one float at a time (the gradient too: A s / |y| per token of an unclipped sequence, 0 for a clipped
    one), and TRL's own sequence-level loss on the same inputs."""
    logp = LOGP.clone().requires_grad_(True)
    loss, _ = rlvr_loss(logp, LOGP_GEN, ADV, MASK, loss_type="gspo", loss_agg="sequence", clip_low=lo, clip_high=hi)
    loss.backward()
    want, grad = 0.0, torch.zeros_like(LOGP)
    for b in range(2):
        for g in range(2):
            toks = [t for t in range(3) if MASK[b, g, t]]
            s = math.exp(sum(float(LOGP[b, g, t] - LOGP_GEN[b, g, t]) for t in toks) / len(toks))
            a = float(ADV[b, g])
            clipped = min(max(s, 1 - lo), 1 + hi)
            want -= min(s * a, clipped * a) / 4
            if s * a <= clipped * a:  # the unclipped branch is the min: the gradient flows through s
                for t in toks:
                    grad[b, g, t] = -a * s / len(toks) / 4
    assert loss.item() == pytest.approx(want, rel=1e-5)
    torch.testing.assert_close(logp.grad, grad, rtol=1e-5, atol=1e-7)
    flat = LOGP.clone().flatten(0, 1).requires_grad_(True)
    trl = trl_grpo_loss(flat, LOGP_GEN.flatten(0, 1), ADV.flatten(), MASK.flatten(0, 1), level="sequence", lo=lo,
                        hi=hi)
    trl.backward()
    assert trl.item() == pytest.approx(loss.item(), rel=1e-5)
    torch.testing.assert_close(flat.grad.view_as(grad), grad, rtol=1e-5, atol=1e-7)


def test_prompt_level_aggregation_is_the_lectures_normaliser():
    """1 / sum_g |y_g| per prompt: prompt 0 has 3 + 1 tokens, prompt 1 has 2 + 3."""
    ones = torch.ones_like(LOGP)
    assert aggregate(ones, MASK, torch.tensor([True, True]), "prompt").item() == pytest.approx(1.0)
    x = torch.zeros_like(LOGP)
    x[0, 1, 0] = 4.0  # the 1-token sample of prompt 0
    assert aggregate(x, MASK, torch.tensor([True, True]), "prompt").item() == pytest.approx((4.0 / 4) / 2)
    assert aggregate(x, MASK, torch.tensor([True, True]), "token").item() == pytest.approx(4.0 / 9)
    assert aggregate(x, MASK, torch.tensor([True, True]), "sequence").item() == pytest.approx(4.0 / 4)


@pytest.mark.parametrize("estimator", ["k3", "k2"])
def test_kl_penalty_in_the_loss_is_the_importance_weighted_estimator(estimator):
    """kl_in=loss: + beta sg(min(rho, eps)) k(d) per token, d = log pi/pi_ref (here 0.3 everywhere), averaged like
    the policy term; train/kl is k3's value whatever trains."""
    ref = LOGP - 0.3
    base, _ = rlvr_loss(LOGP, LOGP_GEN, ADV, MASK, loss_type="cispo", loss_agg="token", epsilon=1.1)
    with_kl, stats = rlvr_loss(LOGP, LOGP_GEN, ADV, MASK, loss_type="cispo", loss_agg="token", ref_logp=ref, beta=0.1,
                               epsilon=1.1, kl_estimator=estimator)
    k = {"k3": math.exp(-0.3) + 0.3 - 1, "k2": 0.3**2 / 2}[estimator]
    iw = torch.clamp(torch.exp(LOGP - LOGP_GEN), max=1.1)
    assert 0 < iw[MASK].min() < 1 and iw[MASK].max() == pytest.approx(1.1)  # both sides of 1, and capped
    assert (with_kl - base).item() == pytest.approx(0.1 * k * (iw * MASK).sum().item() / MASK.sum().item(), rel=1e-4)
    assert stats["kl"].item() == pytest.approx(math.exp(-0.3) + 0.3 - 1, rel=1e-5)


def test_cispo_gradient_does_not_flow_through_rho():
    """On a toy policy, d loss / d theta = -sum sg(min(rho, eps)) A grad log pi / N, exactly: the
    weight is a constant. Letting the gradient into rho (no sg) would give a different gradient."""
    torch.manual_seed(0)
    theta = torch.randn(2, 2, 3, 5, requires_grad=True)  # logits of a toy per-position policy
    tokens = torch.randint(0, 5, (2, 2, 3))
    logp = torch.log_softmax(theta, -1).gather(-1, tokens.unsqueeze(-1)).squeeze(-1)
    logp_gen = (logp.detach() + torch.tensor(0.4).expand_as(logp) * torch.randn_like(logp)).clamp(max=0)
    loss, _ = rlvr_loss(logp, logp_gen, ADV, MASK, loss_type="cispo", loss_agg="token", epsilon=1.2)
    (grad,) = torch.autograd.grad(loss, theta, retain_graph=True)

    w = torch.clamp(torch.exp(logp.detach() - logp_gen), max=1.2)  # constants
    surrogate = -(w * ADV.unsqueeze(-1) * logp * MASK).sum() / MASK.sum()
    (want,) = torch.autograd.grad(surrogate, theta, retain_graph=True)
    assert torch.allclose(grad, want, atol=1e-6)

    rho = torch.exp(logp - logp_gen)  # the same without sg: gradient through rho as well
    no_sg = -(torch.clamp(rho, max=1.2) * ADV.unsqueeze(-1) * logp * MASK).sum() / MASK.sum()
    (wrong,) = torch.autograd.grad(no_sg, theta)
    assert not torch.allclose(grad, wrong, atol=1e-4)


def test_truncation_caps_the_weight_at_epsilon():
    logp = torch.tensor([[[-0.1], [-3.0]]], requires_grad=True)
    logp_gen = torch.tensor([[[-5.0], [-3.0]]])  # rho = e^4.9 ~ 134 for the first, 1 for the second
    adv, mask = torch.tensor([[1.0, -1.0]]), torch.ones(1, 2, 1, dtype=torch.bool)
    loss, stats = rlvr_loss(logp, logp_gen, adv, mask, loss_type="cispo", loss_agg="token", epsilon=5.0)
    (grad,) = torch.autograd.grad(loss, logp)
    assert grad.flatten().tolist() == pytest.approx([-5.0 * 1.0 / 2, -1.0 * -1.0 / 2])
    assert stats["rho/frac_truncated"].item() == pytest.approx(0.5)
    assert stats["rho/max"].item() == pytest.approx(math.exp(4.9), rel=1e-4)


@pytest.mark.parametrize("loss_type,lo,hi,frac", [
    ("cispo", None, None, 1 / 9),  # rho > eps = 1.5: e^2.3 alone
    ("grpo", 0.2, 0.2, 3 / 9),  # A > 0 and rho > 1.2: e^2.3, e^0.2 (prompt 1); A < 0 and rho < 0.8: e^-1
    ("dapo", 0.2, 0.28, 2 / 9),  # clip-higher 1.28 lets e^0.2 = 1.22 through
    ("gspo", 3e-4, 4e-4, 4 / 9),  # per sequence: (0, 0) s = e^(2.3/3), A > 0: 3 tokens; (0, 1) s = e^-1, A < 0: 1
])
def test_ratio_stats_match_a_hand_computation_for_every_loss_type(loss_type, lo, hi, frac):
    """train/logp_diff/*, train/rho/{mean,max,frac_truncated} and train/kl, one float at a time over the 9 completion
    tokens. frac_truncated: CISPO's weight capped (rho > eps), PPO's clipped branch chosen by the min (TRL's
    clip_ratio/region: rho > 1 + e_hi with A > 0, or rho < 1 - e_lo with A < 0), GSPO's on its sequence ratio."""
    from genlight.rl.loss import LossOptions, ratio_stats

    ref = LOGP - torch.tensor([[[0.3, -0.2, 0.5], [0.1, 0.0, 0.0]], [[-0.4, 0.2, 0.0], [0.6, 0.0, -0.1]]])
    stats = ratio_stats(LOGP, LOGP_GEN, ADV, MASK, loss_type, LossOptions(1.5, lo or 0.2, hi or 0.2), ref, beta=0.1)
    toks = _tokens()
    diff = {k: float(LOGP[k] - LOGP_GEN[k]) for k in toks}
    seq = {(b, g): sum(diff[k] for k in toks if k[:2] == (b, g)) / int(MASK[b, g].sum()) for b in range(2) for g in range(2)}
    rho = {k: math.exp(seq[k[:2]] if loss_type == "gspo" else diff[k]) for k in toks}
    if loss_type == "cispo":
        cut = [rho[k] > 1.5 for k in toks]
    else:
        cut = [(rho[k] > 1 + hi and float(ADV[k[:2]]) > 0) or (rho[k] < 1 - lo and float(ADV[k[:2]]) < 0) for k in toks]
    d = {k: float(LOGP[k] - ref[k]) for k in toks}
    want = {
        "logp_diff/mean": sum(abs(v) for v in diff.values()) / 9, "logp_diff/max": max(abs(v) for v in diff.values()),
        "rho/mean": sum(rho.values()) / 9, "rho/max": max(rho.values()), "rho/frac_truncated": sum(cut) / 9,
        "kl": sum(math.exp(-v) + v - 1 for v in d.values()) / 9,
    }
    assert sum(cut) / 9 == pytest.approx(frac)  # the hand count agrees with the comment above
    assert {k: v.item() for k, v in stats.items()} == pytest.approx(want, rel=1e-5)


def test_zero_variance_groups_contribute_nothing():
    """Changing the log-probs of a filtered group changes neither the loss nor anything's gradient."""
    r = torch.tensor([[1.0, 0.0], [1.0, 1.0]])  # prompt 1: all correct -> filtered
    keep = ~zero_variance(r)
    adv = compute_advantages("scalerl", r, keep)
    logp = LOGP.clone().requires_grad_(True)
    loss, _ = rlvr_loss(logp, LOGP_GEN, adv, MASK, keep, loss_type="cispo", loss_agg="prompt")
    (grad,) = torch.autograd.grad(loss, logp)
    assert torch.equal(grad[1], torch.zeros_like(grad[1]))
    other = LOGP.clone()
    other[1] -= 3.0
    loss2, _ = rlvr_loss(other, LOGP_GEN, adv, MASK, keep, loss_type="cispo", loss_agg="prompt")
    assert loss2.item() == pytest.approx(loss.item())
    # the prompt-level mean is over the kept prompt only: the same as a batch of that prompt alone
    alone, _ = rlvr_loss(LOGP[:1], LOGP_GEN[:1], adv[:1], MASK[:1], loss_type="cispo", loss_agg="prompt")
    assert loss.item() == pytest.approx(alone.item())


def test_unknown_loss_options_name_the_key():
    with pytest.raises(ValueError, match="algo.loss_type"):
        rlvr_loss(LOGP, LOGP_GEN, ADV, MASK, loss_type="ppo")
    with pytest.raises(ValueError, match="algo.loss_agg"):
        rlvr_loss(LOGP, LOGP_GEN, ADV, MASK, loss_agg="batch")


# --------------------------------------------------------------------------- rollout engine
def _prompts(tokenizer, texts):
    from genlight.datamodules.lm import pad

    ids = [tokenizer(t)["input_ids"] for t in texts]
    return pad(ids, tokenizer.pad_token_id, left=True), pad([[1] * len(i) for i in ids], 0, left=True)


def _nucleus_logps(model, ids, mask, roll, temperature, top_p):
    """log-probs of the sampled tokens under the top-p nucleus of one full forward's logits, by hand: the tokens
    sorted by probability, kept up to and including the one where the cumulative mass reaches top_p, renormalised."""
    seq = torch.cat([ids, roll.completion_ids], 1)
    att = torch.cat([mask, roll.completion_mask.long()], 1)
    with torch.no_grad():
        logits = model(input_ids=seq, attention_mask=att, position_ids=(att.cumsum(-1) - 1).clamp(min=0)).logits
    logits = logits[:, ids.size(1) - 1 : -1].float() / temperature
    out = torch.zeros_like(roll.logps)
    for i, j in roll.completion_mask.nonzero().tolist():
        p = torch.softmax(logits[i, j], -1)
        order = p.argsort(descending=True).tolist()
        kept, mass = [], 0.0
        for v in order:
            kept.append(v)
            mass += float(p[v])
            if mass >= top_p:
                break
        tok = int(roll.completion_ids[i, j])
        out[i, j] = math.log(p[tok] / p[kept].sum()) if tok in kept else float("-inf")
    return out


def test_rollout_logps_equal_a_full_forward_and_rows_stop_at_eos(tokenizer):
    from genlight.models import tiny_llama
    from genlight.models.rollout import HFRollout

    model = tiny_llama(tokenizer, seed=0)
    ids, mask = _prompts(tokenizer, ["12+3=", "1+1=", "45+67="])
    engine = HFRollout(model, tokenizer.eos_token_id, tokenizer.pad_token_id)
    for temperature, top_p in [(1.0, 1.0), (0.7, 0.9)]:
        roll = engine.generate(ids, mask, 4, 10, temperature, top_p, torch.Generator().manual_seed(1))
        assert roll.completion_ids.shape[0] == 12
        if top_p == 1.0:  # the trainer's log-probs of the sampled tokens
            logp, _ = completion_logps(model, ids.repeat_interleave(4, 0), mask.repeat_interleave(4, 0),
                                       roll.completion_ids, roll.completion_mask, temperature)
        else:  # the nucleus distribution's, renormalised, which is what was sampled from (and what vLLM records)
            logp = _nucleus_logps(model, ids.repeat_interleave(4, 0), mask.repeat_interleave(4, 0), roll, temperature,
                                  top_p)
            full, _ = completion_logps(model, ids.repeat_interleave(4, 0), mask.repeat_interleave(4, 0),
                                       roll.completion_ids, roll.completion_mask, temperature)
            assert (roll.logps - full)[roll.completion_mask].min() > 1e-3  # renormalised: above the full ones
        assert torch.allclose(logp, roll.logps, atol=1e-5), "sampler log-probs differ from the policy's"
        for row, m, trunc in zip(roll.completion_ids, roll.completion_mask, roll.truncated):
            n = int(m.sum())
            assert m[:n].all() and not m[n:].any()
            ended = row[n - 1] == tokenizer.eos_token_id
            assert bool(trunc) == (not ended) and (ended or n == 10)
    # same generator seed -> same samples; the shared-prefix cache equals per-sample prefill
    a = engine.generate(ids, mask, 3, 6, 1.0, 1.0, torch.Generator().manual_seed(5))
    b = engine.generate(ids, mask, 3, 6, 1.0, 1.0, torch.Generator().manual_seed(5))
    assert torch.equal(a.completion_ids, b.completion_ids)
    greedy = engine.generate(ids, mask, 2, 6, 1.0, 1e-9, torch.Generator().manual_seed(0))
    want = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=6, do_sample=False,
                          pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)[:, ids.size(1):]
    for i in range(3):
        n = int(greedy.completion_mask[2 * i].sum())
        assert greedy.completion_ids[2 * i, :n].tolist() == want[i, :n].tolist()


# --------------------------------------------------------------------------- verifiers
@pytest.mark.parametrize("name", ["exact", "numeric", "math"])
@pytest.mark.parametrize("completion", ["", "   ", "\x00\x01", "١٢٣", "🙂" * 50, "9" * 100_000, "1e999999",
                                        "nan", "inf", "\\boxed{", "\\boxed{\\boxed{}", "{}}}{{", None, "12,34,5"])
def test_builtin_verifiers_never_raise(name, completion):
    from genlight import rewards

    v = {"exact": rewards.ExactAnswer(), "numeric": rewards.NumericAnswer(abs_tol=0.5), "math": rewards.MathVerify()}[name]
    assert v(completion, "123") in (0.0, 1.0)
    v.extract(completion or "")


def test_verifiers_score_what_they_should():
    from genlight.rewards import ExactAnswer, MathVerify, NumericAnswer

    assert ExactAnswer()(" 42 ", "42") == 1.0 and ExactAnswer()("042", "42") == 0.0
    assert ExactAnswer()("４２", "42") == 1.0  # full-width digits (NFKC)
    n = NumericAnswer(abs_tol=0.01)
    assert n("3.141", "3.14") == 1.0 and n("3.2", "3.14") == 0.0 and n("1,000", "1000") == 1.0
    assert NumericAnswer(rel_tol=0.1)("105", "100") == 1.0 and n("2+2", "4") == 0.0  # never evaluated
    m = MathVerify()
    assert m("so x = 3 and then \\boxed{\\frac{1}{2}}", "\\frac{1}{2}") == 1.0
    assert m("first 3, then 7. The answer is \\boxed{12}.", "12") == 1.0
    assert m("first 3, then 7, so 12", "12") == 1.0 and m("12 or maybe 13", "12") == 0.0
    assert m.extract("\\boxed{2.50}") == m.extract("2.5")


# the cases where math-verify and a "last \\boxed{} or last number, compared as numbers or text" verifier (this
# project's reward=math before; `reward=math` is now math_verify's alias) differ: (completion, reference, math-verify,
# the old verifier)
MATH_DIFFERENCES = [
    ("The answer is \\boxed{\\frac{1}{2}}", "0.5", 1.0, 0.0),  # a fraction against its decimal
    ("so 1/2", "0.5", 1.0, 0.0),
    ("\\boxed{0.5}", "\\frac12", 1.0, 0.0),  # a bare LaTeX reference
    ("\\boxed{\\{3,2,1\\}}", "\\{1,2,3\\}", 1.0, 0.0),  # sets, in any order
    ("\\boxed{5\\text{ cm}}", "5", 1.0, 0.0),  # units
    ("\\boxed{[1,2)}", "[1,2)", 1.0, 1.0),  # intervals: the same one ...
    ("\\boxed{(1,2]}", "[1,2)", 0.0, 0.0),  # ... and another
    ("\\boxed{x^2+2x+1}", "(x+1)^2", 1.0, 0.0),  # symbolic equality
    ("\\boxed{\\sqrt{2}}", "1.414214", 1.0, 0.0),  # numbers to 6 decimals
    ("\\boxed{50\\%}", "50\\%", 1.0, 1.0),  # percent: as written ...
    ("\\boxed{50\\%}", "0.5", 0.0, 0.0),  # ... not converted to a fraction
]


def last_answer_verifier(completion: str, reference: str) -> float:
    """The old verifier, written again here as the reference: the last \\boxed{} (else the last number) of the
    completion, compared with the reference as numbers when both are, else as text."""
    import re

    from genlight.rewards import parse_number

    boxed = re.findall(r"\\boxed\{((?:[^{}]|\{[^{}]*\})*)\}", completion)
    numbers = re.findall(r"-?\d+(?:\.\d+)?", completion)
    pred = boxed[-1] if boxed else (numbers[-1] if numbers else None)
    if pred is None:
        return 0.0
    a, b = parse_number(pred), parse_number(reference)
    return float(a == b) if a is not None and b is not None else float(pred.strip() == reference.strip())


@pytest.mark.parametrize("completion, reference, want, old", MATH_DIFFERENCES)
def test_math_verify_where_it_differs_from_a_last_number_verifier(completion, reference, want, old):
    """math-verify's score, and the old verifier's (`last_answer_verifier`): each row is what the table says of both,
    so the rows where they differ are differences of the two, not of the table."""
    from genlight.rewards import MathVerify

    assert MathVerify()(completion, reference) == want
    assert last_answer_verifier(completion, reference) == old


def test_math_verify_works_off_the_main_thread_and_in_a_forked_worker():
    """math-verify's timeouts use SIGALRM, which raises outside the main thread: ours turns them off there."""
    import multiprocessing
    import threading

    from genlight.rewards import MathVerify

    m, out = MathVerify(), []
    t = threading.Thread(target=lambda: out.append(m("\\boxed{\\frac{1}{2}}", "0.5")))
    t.start()
    t.join()
    assert out == [1.0]
    with multiprocessing.get_context("fork").Pool(1) as pool:  # a dataloader worker / a forked DDP rank
        assert pool.apply(m, ("\\boxed{\\frac{1}{2}}", "0.5")) == 1.0


def test_an_unparsable_math_reference_stops_before_training_naming_its_row(cfg_factory, tmp_path):
    import json

    from genlight.pipeline import train

    rows = [{"prompt": f"{i}+1=", "answer": str(i + 1)} for i in range(20)] + [{"prompt": "?", "answer": "\\frac{"}]
    (tmp_path / "p.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = cfg_factory("algo=rlvr", "reward=math_verify", "data=jsonl_prompts", f"data.source.train={tmp_path}/p.jsonl",
                      "data.source.val_fraction=0.1", "warm_start.max_steps=0", "trainer.max_steps=1", "logger=none",
                      quick=False)
    with pytest.raises(ValueError, match=r"p.jsonl:21: reward=math_verify cannot parse the reference answer"):
        train(cfg)


def _raising_reward(completion: str, answer: str) -> float:
    raise KeyError("boom")


def test_a_raising_verifier_is_reported_with_its_prompt():
    from genlight.rewards import FunctionReward, RewardError, score

    v = FunctionReward(_raising_reward)
    with pytest.raises(RewardError, match=r"_raising_reward.*KeyError.*prompt '7\+8='.*completion '15'"):
        score(v, ["7+8="], ["15"], ["15"])
    r, errors = score(v, ["7+8=", "1+1="], ["15", "2"], ["15", "2"], on_error="zero")
    assert r == [0.0, 0.0] and errors == 2
    nan = FunctionReward(lambda c, a: float("nan"))
    with pytest.raises(RewardError, match="non-finite"):
        score(nan, ["p"], ["c"], ["a"])


# --------------------------------------------------------------------------- pass@k, majority
def test_pass_at_k_is_the_unbiased_estimator():
    for n, c in [(8, 0), (8, 1), (8, 3), (8, 8), (5, 2)]:
        for k in range(1, n + 1):
            subsets = list(combinations([1] * c + [0] * (n - c), k))
            want = sum(any(s) for s in subsets) / len(subsets)  # mean over all k-subsets
            assert pass_at_k(n, c, k) == pytest.approx(want)
    with pytest.raises(ValueError):
        pass_at_k(4, 1, 5)


def test_majority_vote_and_metric():
    assert majority_correct(["5", "6", "5", None], [True, False, True, False])
    assert not majority_correct(["6", "6", "5"], [False, False, True])
    assert not majority_correct([None, None], [False, False])
    m = PassAtK([1, 2])
    m.update([[True, False], [False, False]], [["1", "2"], ["3", "3"]])
    out = m.compute()
    assert out["pass@1"].item() == pytest.approx(0.25) and out["pass@2"].item() == pytest.approx(0.5)
    assert out["majority"].item() == pytest.approx(0.5)


# --------------------------------------------------------------------------- ScaleRL fit
def test_sigmoid_fit_recovers_known_parameters():
    from genlight.callbacks.scalerl_curve import fit_sigmoid, sigmoid_curve

    r0, a, b, c_mid = 0.1, 0.72, 1.6, 3e12
    c = np.geomspace(1e11, 2e13, 25)
    noise = np.random.default_rng(0).normal(0, 0.003, c.shape)
    got = fit_sigmoid(c, sigmoid_curve(c, r0, a, b, c_mid) + noise, r0=r0, skip_fraction=0.0)
    assert got[0] == pytest.approx(a, abs=0.02)
    assert got[1] == pytest.approx(b, rel=0.1)
    assert got[2] == pytest.approx(c_mid, rel=0.1)
    with pytest.raises(ValueError, match="3 points"):
        fit_sigmoid(c[:10], sigmoid_curve(c[:10], r0, a, b, c_mid), r0=r0, skip_fraction=0.999)


def test_bootstrap_standard_errors_cover_the_truth_and_grow_with_the_noise():
    """Synthetic points of a known curve with Gaussian noise: the fitted A lies within 3 standard errors of the truth,
    and ten times the noise gives several times the standard errors (the bootstrap measures the scatter)."""
    from genlight.callbacks.scalerl_curve import bootstrap_fit, sigmoid_curve

    r0, a, b, c_mid = 0.2, 0.65, 1.4, 4e12
    c = np.geomspace(5e11, 2e13, 16)
    fits = {}
    for sd in (0.004, 0.04):
        noise = np.random.default_rng(1).normal(0, sd, c.shape)
        fits[sd] = bootstrap_fit(c, sigmoid_curve(c, r0, a, b, c_mid) + noise, r0=r0, skip_fraction=0.0, n_boot=200)
        f = fits[sd]
        assert abs(f["A"] - a) < 3 * f["A_se"] + 1e-3, f
        assert abs(np.log(f["C_mid"] / c_mid)) < 3 * f["C_mid_se"] / c_mid + 0.05, f
        assert len(f["samples"]) >= 150
    assert fits[0.04]["A_se"] > 3 * fits[0.004]["A_se"]
    assert fits[0.004]["A_se"] < 0.02


def test_bootstrap_error_of_a_levelled_off_curve_is_not_set_by_the_few_refits_that_run_to_the_bound():
    """A measured curve (experiment=scalerl, baseline, seed 0: R_0 and 24 validations, compute in 1e11 FLOPs) that
    levels off near 0.41: a few bootstrap resamples look still rising and their refits run to A = 1. The standard
    error is the refits' central spread (about 0.02), not their standard deviation (0.14, set by those few), and
    A - R_0 is several errors wide: the asymptote is identified."""
    from genlight.callbacks.scalerl_curve import bootstrap_fit

    c = 1e11 * np.array([0.0, 5.27, 10.61, 15.92, 21.23, 26.59, 32.01, 37.44, 42.84, 48.24, 53.6, 59.12, 64.62, 70.14,
                         75.59, 81.22, 86.85, 92.45, 98.15, 103.85, 109.47, 115.27, 121.04, 126.82, 132.65])
    r = np.array([0.317, 0.3548, 0.3848, 0.3905, 0.3952, 0.3968, 0.3955, 0.4053, 0.4075, 0.4083, 0.4175, 0.405, 0.4157,
                  0.4108, 0.4195, 0.4105, 0.3993, 0.4168, 0.424, 0.427, 0.418, 0.4103, 0.4288, 0.3955, 0.4168])
    f = bootstrap_fit(c, r, r0=0.317, skip_fraction=0.1, n_boot=100)
    assert 0.40 < f["A"] < 0.44
    assert (f["samples"][:, 0] > 0.9).sum() >= 3, "no refit ran to the bound: the case this test is for is gone"
    assert f["samples"][:, 0].std() > 0.1 and f["A_se"] < 0.03
    assert f["A"] - 0.317 > 3 * f["A_se"]


def test_predictive_check_fits_the_early_points_and_reports_the_error_at_the_last():
    """Points exactly on a curve: the fit on the first half of the compute predicts the last point (error ~0); a last
    point moved by +0.1 is reported as an error of -0.1 (predicted - observed), and the early fit ignores it."""
    from genlight.callbacks.scalerl_curve import predictive_check, sigmoid_curve

    r0, a, b, c_mid = 0.2, 0.7, 1.5, 3e12
    c = np.linspace(0.5e12, 1.6e13, 16)
    r = sigmoid_curve(c, r0, a, b, c_mid)
    got = predictive_check(c, r, r0, fraction=0.5, skip_fraction=0.0)
    assert got["predicted"] == pytest.approx(float(r[-1]), abs=1e-4) and got["error"] == pytest.approx(0.0, abs=1e-4)
    assert got["fit_compute"] == pytest.approx(c[c <= 8e12].max())
    r2 = r.copy()
    r2[-1] += 0.1
    moved = predictive_check(c, r2, r0, fraction=0.5, skip_fraction=0.0)
    assert moved["observed"] == pytest.approx(float(r[-1]) + 0.1)
    assert moved["error"] == pytest.approx(-0.1, abs=1e-4)
    with pytest.raises(ValueError, match="3 points"):
        predictive_check(c, r, r0, fraction=0.1, skip_fraction=0.0)
    with pytest.raises(ValueError, match="predict_fraction"):
        predictive_check(c, r, r0, fraction=1.0)


def test_scalerl_callback_logs_the_errors_the_band_and_the_prediction(tmp_path):
    """The callback over a run's validations (a stand-in trainer and module): each fit logs A, B, C_mid with their
    bootstrap errors, the end of training logs the predictive check, and scalerl_fit.json holds both."""
    import types

    from genlight.callbacks.scalerl_curve import ScaleRLCurve, bootstrap_fit, predictive_check, sigmoid_curve

    logged = []
    logger = types.SimpleNamespace(log_metrics=lambda m, step: logged.append(dict(m)))
    trainer = types.SimpleNamespace(loggers=[logger], is_global_zero=True, global_step=0)
    cb = ScaleRLCurve(skip_fraction=0.0, dirpath=str(tmp_path), n_bootstrap=30, predict_fraction=0.5)
    c = np.linspace(0, 1.6e13, 17)
    r = sigmoid_curve(np.maximum(c, 1), 0.2, 0.7, 1.5, 3e12) + np.random.default_rng(0).normal(0, 0.01, c.shape)
    r[0] = 0.2
    for i, (ci, ri) in enumerate(zip(c, r)):
        trainer.global_step = 10 * i
        cb.on_validation_end(trainer, types.SimpleNamespace(compute=float(ci), last_val={"val/pass@1": float(ri)}))
    fits = [m for m in logged if "scalerl/A" in m]
    assert len(fits) == 17 - 3
    want = bootstrap_fit(c, r, 0.2, 0.0, n_boot=30)  # the same points, the same resamples (seed 0)
    assert fits[-1] == pytest.approx({"scalerl/R0": 0.2, **{f"scalerl/{k}": want[k] for k in
                                      ("A", "B", "C_mid", "A_se", "B_se", "C_mid_se")}}, rel=1e-9)
    cb.on_train_end(trainer, None)
    want = predictive_check(c, r, 0.2, 0.5, 0.0)
    assert logged[-1]["scalerl/prediction_error"] == pytest.approx(want["error"])
    saved = json.loads((tmp_path / "scalerl_fit.json").read_text())
    assert saved["prediction"]["predicted"] == pytest.approx(want["predicted"]) and saved["A_se"] == fits[-1]["scalerl/A_se"]
    assert (tmp_path / "scalerl_curve.png").exists()


@pytest.mark.parametrize("row,message", [
    ({"prompt": "1+1="}, "prompts.jsonl:2: missing key 'answer'"),
    ({"prompt": "", "answer": "2"}, "prompts.jsonl:2: empty string for key 'prompt'"),
    ({"prompt": "1+1=", "answer": " "}, "prompts.jsonl:2: 'answer' must be a non-empty"),
    ({"question": "1+1=", "answer": "2"}, "prompts.jsonl:2: missing key 'prompt'"),
])
def test_bad_prompt_rows_name_file_and_line(tmp_path, tokenizer, row, message):
    from genlight.datamodules.files import DataError, FileSource
    from genlight.datamodules.lm import LMDataModule
    from tests.conftest import write_jsonl

    path = write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": "2+2=", "answer": "4"}, row])
    dm = LMDataModule(FileSource(train=str(path), val=str(path)), tokenizer, kind="prompt", max_length=32)
    with pytest.raises(DataError, match=message.replace("+", r"\+")):
        dm.setup("fit")


# --------------------------------------------------------------------------- training runs
class Record(L.Callback if (L := __import__("lightning")) else object):
    """Prompt indices of each batch by epoch; whether pi_gen equals the policy before each step; the prompts whose
    step pass rate reached 0.9 (the parity verifier pays 1 to a pass: rewards >= 1 of the step's batch)."""

    def __init__(self):
        self.seen, self.gen_equal, self.retired_at_start, self.should_retire = {}, {}, {}, set()

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        rate = (module.last_batch["rewards_all"] >= 1).float().mean(-1)
        self.should_retire |= {i for i, p in zip(batch["index"].tolist(), rate.tolist()) if p >= 0.9}

    def on_train_epoch_start(self, trainer, module):
        self.retired_at_start[trainer.current_epoch] = set(module.retired)

    def on_train_batch_start(self, trainer, module, batch, batch_idx):
        self.seen.setdefault(trainer.current_epoch, []).extend(batch["index"].tolist())
        same = all(torch.equal(p, q) for p, q in zip(module.model.parameters(), module.generator.parameters()))
        self.gen_equal[trainer.global_step] = same


def test_retired_prompts_are_never_sampled_again_and_resume_is_exact(cfg_factory, tmp_path):
    from genlight.datamodules.arithmetic import ArithmeticTask

    task = ArithmeticTask(n_train=16, n_val=16, n_test=16)
    even = {i for i, p in enumerate(task.splits["train"]) if int(p.answer) % 2 == 0}
    assert 0 < len(even) < 16

    rec = Record()
    _, full = train_with(cfg_factory(*RUN, "trainer.max_steps=8", "callbacks.model_checkpoint.save_top_k=-1"), rec)
    module = full["module"]
    assert even <= module.retired, "prompts with pass rate >= 0.9 are retired"
    assert module.retired == rec.should_retire, "exactly the prompts whose pass rate reached 0.9 at a step retire"
    assert sorted(rec.seen[0]) == list(range(16))
    for epoch, idx in rec.seen.items():
        assert not set(idx) & rec.retired_at_start[epoch], f"a retired prompt was sampled again in epoch {epoch}"
    assert even <= rec.retired_at_start[1]
    # pi_gen is the policy right after each refresh (steps 0, 3, 6) and lags it in between
    assert rec.gen_equal[0] and rec.gen_equal[3] and rec.gen_equal[6]
    assert not rec.gen_equal[4] and not rec.gen_equal[5] and not rec.gen_equal[7]

    # its own checkpoint at step 4 (a shorter run would warm the lr up over fewer steps: another trajectory)
    ckpt = tmp_path / "checkpoints" / "step000004.ckpt"
    state = torch.load(ckpt, weights_only=True)
    assert state["global_step"] == 4
    assert set(state["rlvr"]["retired"]) == even
    assert any(k.startswith("generator.") for k in state["state_dict"])
    rec_resumed = Record()
    _, resumed = train_with(cfg_factory(*RUN, "trainer.max_steps=8", f"ckpt_path={ckpt}"), rec_resumed)
    assert resumed["module"].retired == even
    assert {e: v for e, v in rec_resumed.seen.items()} == {e: v for e, v in rec.seen.items() if e > 0}
    for (n, p), q in zip(module.state_dict().items(), resumed["module"].state_dict().values()):
        assert torch.allclose(p, q, atol=1e-6), n
    assert resumed["module"].compute == pytest.approx(module.compute)


class EvalPasses(L.Callback if (L := __import__("lightning")) else object):
    """At each validation, every sample's pass and reward as the module scored them (its `score`, wrapped), grouped
    by prompt; then val/pass@k and val/reward/mean by hand: pass@k = 1 - C(n - c, k) / C(n, k) per prompt (c of its n
    samples pass), the mean over prompts, against what the module reported (`last_val`)."""

    def __init__(self):
        self.checked = []

    def on_validation_epoch_start(self, trainer, module):
        self.passed, self.rewards = [], []
        scorer = type(module).score

        def record(batch, *args, **kwargs):
            r, passed, errors = scorer(module, batch, *args, **kwargs)
            self.passed += passed.view(len(batch["prompts"]), -1).tolist()
            self.rewards += r.flatten().tolist()
            return r, passed, errors

        module.score = record

    def on_validation_end(self, trainer, module):
        del module.score  # the class's method again
        n = len(self.passed[0])
        want = {f"val/pass@{k}": sum(1 - math.comb(n - sum(p), k) / math.comb(n, k) for p in self.passed) / len(self.passed)
                for k in (1, 2, 4, 8) if k <= n}
        want["val/pass@k"] = want[f"val/pass@{n}"]
        want["val/reward/mean"] = sum(self.rewards) / len(self.rewards)
        self.checked.append((len(self.passed), want, {k: module.last_val[k] for k in want}))


def test_val_pass_at_k_and_mean_reward_are_the_validations_samples_by_hand(cfg_factory):
    """val/pass@1, @2, @4 (4 samples per prompt) and val/reward/mean over all 16 val prompts in 2 batches, at each
    validation, against the hand formula on the samples the module scored."""
    rec = EvalPasses()
    train_with(cfg_factory(*RUN, "trainer.max_steps=2", "trainer.val_check_interval=2", "data.eval_batch_size=8",
                           "algo.val_num_samples=4", "trainer.num_sanity_val_steps=-1"), rec)
    assert len(rec.checked) == 2  # before training and after step 2
    for prompts, want, got in rec.checked:
        assert prompts == 16
        assert got == pytest.approx(want, rel=1e-6)
    assert 0 < rec.checked[0][1]["val/pass@1"] < rec.checked[0][1]["val/pass@4"] < 1  # the values exercise the formula


@pytest.mark.slow
def test_rlvr_default_recipe_raises_heldout_pass_at_1_from_its_warm_start(cfg_factory):
    """`algo=rlvr` as shipped (warm start to greedy exact match 0.4, 64 prompts x 8, lr 1e-4), 200 of its 400
    steps: first the start must be in its band (else the warm start failed, not RL), then held-out pass@1
    (8 samples per prompt, 500 prompts) must climb by 15 points or more (measured: about 30)."""
    from genlight.callbacks import ScaleRLCurve

    cfg = cfg_factory("algo=rlvr", "trainer.max_steps=200", "trainer.val_check_interval=50", "test=false", "logger=none",
                      "trainer.enable_progress_bar=false", quick=False)
    rec = EvalPasses()
    metrics, objs = train_with(cfg, rec)
    curve = next(c for c in objs["trainer"].callbacks if isinstance(c, ScaleRLCurve))
    (c0, r0), (_, final) = curve.points[0], curve.points[-1]
    assert c0 == 0.0 and len(curve.points) == 5
    assert 0.1 <= r0 <= 0.4, f"the warm start is off: pass@1 {r0:.3f} before RL (expected 0.1-0.4)"
    assert final - r0 >= 0.15, f"RL did not learn: val pass@1 {r0:.3f} -> {final:.3f}"
    for prompts, want, got in rec.checked:  # pass@1 .. pass@8 over the 500 prompts, by hand from the samples
        assert prompts == 500 and got == pytest.approx(want, rel=1e-6)
    assert [w["val/pass@1"] for _, w, _ in rec.checked] == pytest.approx([r for _, r in curve.points], rel=1e-6)
    assert curve.fit is not None and r0 < curve.fit[0] <= 1


class StepMetrics(L.Callback if (L := __import__("lightning")) else object):
    """The train metrics logged at each optimizer step."""

    def __init__(self):
        self.at: dict[int, dict[str, float]] = {}

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        self.at[trainer.global_step - 1] = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("train/")}


def _rho_spread(m: dict) -> float:
    return max(abs(m["train/rho/mean"] - 1), abs(m["train/rho/max"] - 1))


def test_variants_differ_where_they_should(cfg_factory):
    """Each variant does what sets it apart, step by step:
    - dapo on-policy (generation_lag=0): the sampler is the policy itself, so rho = 1 at every step;
    - grpo with generation_lag=3: pi_gen equals the policy at step 0 (rho = 1), then lags it (rho != 1);
    - beta > 0: KL to the reference (pi_0) is 0 before the first update and > 0 after it."""
    steps = ["trainer.max_steps=3", "trainer.val_check_interval=3", "algo.warmup_steps=0"]  # lr > 0 from step 0
    dapo = StepMetrics()
    _, objs = train_with(cfg_factory(*RUN, *steps, "loss=dapo", "algo.generation_lag=0"), dapo)
    assert objs["module"].generator is None and objs["module"].hparams.loss_agg == "token"
    for step, m in dapo.at.items():
        assert _rho_spread(m) < 1e-4, f"dapo on-policy: rho != 1 at step {step}: {m['train/rho/max']}"
        assert m["train/rho/frac_truncated"] == 0.0

    grpo = StepMetrics()
    train_with(cfg_factory(*RUN, *steps, "loss=grpo", "algo.generation_lag=3"), grpo)
    assert _rho_spread(grpo.at[0]) < 1e-4
    assert _rho_spread(grpo.at[1]) > 1e-3 and _rho_spread(grpo.at[2]) > 1e-3, "pi_gen should lag the policy"

    kl = StepMetrics()
    _, objs = train_with(cfg_factory(*RUN, *steps, "algo.beta=0.1", "algo.loss_agg=token"), kl)
    assert objs["module"].ref_model is not None
    assert kl.at[0]["train/kl"] < 1e-6 and kl.at[1]["train/kl"] > 1e-5 and kl.at[2]["train/kl"] > 1e-5


class TokenCounts(L.Callback if (L := __import__("lightning")) else object):
    """Per step, counted apart from the module's own counters: the prompt tokens of the step's rows (their
    `prompt_ids` in the DataModule, once per prompt), the generated tokens of each completion the engine returned (up
    to and with its first <eos>, or all `max_new_tokens` of a cut one), the policy's parameters and the logged
    train/compute_flops."""

    def __init__(self, rolls: list):
        self.rolls, self.steps = rolls, []

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        rows = trainer.datamodule.examples["train"]
        prompt = sum(len(rows[i]["prompt_ids"]) for i in batch["index"].tolist())
        eos, limit = module.tokenizer.eos_token_id, module.hparams.max_new_tokens
        generated = 0
        for ids in self.rolls[-1].completion_ids.tolist():
            generated += ids.index(eos) + 1 if eos in ids[:limit] else limit
        self.steps.append({"prompt": prompt, "generated": generated, "n": module.model.num_parameters(),
                           "flops": float(trainer.callback_metrics["train/compute_flops"])})


@pytest.fixture
def recorded_rolls(monkeypatch):
    """Every rollout the HF engine returns, in order (the last is the step's: validation is off)."""
    from genlight.models.rollout import HFRollout

    rolls, generate = [], HFRollout.generate
    monkeypatch.setattr(HFRollout, "generate", lambda self, *a, **k: rolls.append(generate(self, *a, **k)) or rolls[-1])
    return rolls


@pytest.mark.parametrize("recompute", [False, True])
def test_compute_flops_is_2n_per_sampled_token_and_6n_per_trained_token(cfg_factory, recorded_rolls, recompute):
    """train/compute_flops (the ScaleRL curve's x-axis), cumulative, by hand: per step 2 N (P + Gen) for sampling (each
    prompt prefilled once for its G samples, each generated token once) + 6 N (P + Gen) for training (each prompt
    encoded once for its samples) + 2 N (P + Gen) for pi_old's recompute when on. Counting a prompt once per sample
    (x G) or a trained token at 2 N would be another number."""
    rec = TokenCounts(recorded_rolls)
    cfg = cfg_factory(*RUN, "trainer.max_steps=3", "trainer.val_check_interval=null", "+trainer.limit_val_batches=0",
                      "trainer.num_sanity_val_steps=0", f"algo.recompute_gen_logps={str(recompute).lower()}")
    train_with(cfg, rec)
    assert len(rec.steps) == 3 and len(recorded_rolls) == 3
    total = 0.0
    for step in rec.steps:
        tokens = step["prompt"] + step["generated"]
        total += (2 + 6 + (2 if recompute else 0)) * step["n"] * tokens
        assert step["flops"] == pytest.approx(total, rel=1e-6)


def test_fp32_head_under_bf16_autocast(tokenizer):
    """ScaleRL's FP32 logits: under bf16 mixed precision the LM head and log-softmax stay float32."""
    from genlight.models import tiny_llama
    from genlight.models.lm import fp32_logits

    model = tiny_llama(tokenizer, seed=0)
    hidden = torch.randn(3, 5, model.config.hidden_size)
    want = fp32_logits(model, hidden)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = fp32_logits(model, hidden)
        plain = model.get_output_embeddings()(hidden)  # what autocast does to an ordinary head
        ids, mask = _prompts(tokenizer, ["12+3=", "1+1="])
        logp, _ = completion_logps(model, ids, mask, torch.tensor([[5, 6], [7, 2]]), torch.ones(2, 2, dtype=torch.bool))
    assert got.dtype == torch.float32 and torch.equal(got, want)
    assert plain.dtype == torch.bfloat16  # (so the test would see a bf16 head)
    assert logp.dtype == torch.float32


def test_wandb_run_holds_rl_metrics_and_completion_table(cfg_factory, tmp_path):
    """What reached the offline W&B run, read back with `wandb leet inspect` (no mocked logger)."""
    cfg = cfg_factory(*RUN, "logger=wandb", "trainer.max_steps=2", "trainer.val_check_interval=2",
                      "algo.log_completions_every_n_steps=1")
    train_with(cfg)
    (run,) = list((tmp_path / "wandb").glob("offline-run-*"))
    history = [r["history"]["item"] for r in leet(run, summary=False) if r["type"] == "history"]
    keys = set().union(*history)
    for k in ("train/reward/mean", "train/pass_rate", "train/frac_zero_variance", "train/rho/mean",
              "train/logp_diff/mean", "train/entropy", "perf/gen_tokens_per_s", "val/pass@1", "val/pass@2", "val/majority@k",
              "train/samples", "val/samples", "val/compute_flops"):  # the samples / compute axes
        assert k in keys, k
    tables = [h for h in history if h.get("train/completions._type") == "table-file"]
    assert tables and tables[0]["train/completions.nrows"] == 4 * 4  # 4 prompts x G = 4 samples
    table = json.loads((run / "files" / tables[0]["train/completions.path"]).read_text())
    assert table["columns"] == ["step", "prompt", "completion", "answer", "reward", "truncated"]
    assert all(row[4] in (0.0, 1.0) for row in table["data"])


def _scalerl_run(cfg_factory, sanity: int):
    """6 steps, a validation every 2 on 2 val batches; the ScaleRLCurve and what reached metrics.csv."""
    import csv

    from genlight.callbacks import ScaleRLCurve

    cfg = cfg_factory(*RUN, "trainer.max_steps=6", "trainer.val_check_interval=2", "data.eval_batch_size=8",
                      f"trainer.num_sanity_val_steps={sanity}", "logger=csv", "callbacks.model_checkpoint=null")
    _, objs = train_with(cfg)
    curve = next(c for c in objs["trainer"].callbacks if isinstance(c, ScaleRLCurve))
    rows = list(csv.DictReader((Path(objs["trainer"].logger.log_dir) / "metrics.csv").open()))
    return curve, objs["trainer"], {k for r in rows for k, v in r.items() if v}


def test_scalerl_fit_gets_r0_from_the_full_val_set_whatever_the_sanity_check(cfg_factory):
    """R_0 is the pass rate of a full validation before training. With trainer.num_sanity_val_steps=0 (experiment=gsm8k)
    the curve had no point at compute 0, so it never fitted and said nothing; with 1 its R_0 was the first val batch's.
    Both now get the full validation's R_0 (the -1 run's, the same seed: the same policy and samples), the fit, and
    scalerl/* in the logs."""
    full, trainer, _ = _scalerl_run(cfg_factory, -1)
    assert trainer.num_val_batches == [2] and full.points[0][0] == 0.0 and full.fit is not None
    for sanity in (0, 1):
        curve, _, logged = _scalerl_run(cfg_factory, sanity)
        assert curve.points[0] == full.points[0], f"num_sanity_val_steps={sanity}"
        assert len(curve.points) == 4 and curve.fit == pytest.approx(full.fit)
        assert {"scalerl/A", "scalerl/B", "scalerl/C_mid", "scalerl/R0"} <= logged


def test_scalerl_curve_without_r0_says_so_once_and_fits_nothing(caplog):
    """Points that do not start at compute 0 (a run resumed from a checkpoint without R_0): no fit, no scalerl/*, and
    one warning naming the setting to change."""
    import logging
    import types

    from genlight.callbacks.scalerl_curve import ScaleRLCurve, sigmoid_curve

    logged = []
    trainer = types.SimpleNamespace(loggers=[types.SimpleNamespace(log_metrics=lambda m, step: logged.append(m))],
                                    global_step=0, is_global_zero=True)
    cb = ScaleRLCurve(n_bootstrap=10, min_points=4)
    with caplog.at_level(logging.WARNING, logger="genlight.callbacks.scalerl_curve"):
        for c in np.geomspace(1e11, 1e13, 8):
            r = float(sigmoid_curve(c, 0.1, 0.6, 1.5, 1e12))
            cb.on_validation_end(trainer, types.SimpleNamespace(compute=float(c), last_val={"val/pass@1": r}))
    assert cb.fit is None and logged == [] and len(cb.points) == 8
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "trainer.num_sanity_val_steps=-1" in warnings[0]


# --------------------------------------------------------------------------- review fixes (issue 27)
class GradNorms(__import__("lightning").Callback):
    """The gradient norm the optimizer applies at each step (a step pre-hook: after unscaling and clipping)."""

    def __init__(self):
        self.norms = []

    def on_train_start(self, trainer, module):
        def record(optimizer, args, kwargs):
            grads = [p.grad for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
            self.norms.append(float(torch.linalg.vector_norm(torch.stack([g.float().norm() for g in grads]))))

        trainer.optimizers[0].register_step_pre_hook(record)


def test_fp16_loss_scaling_is_undone_before_clipping(cfg_factory):
    """16-mixed (GradScaler, loss x 2^16): RLVR clips the unscaled gradients, as Lightning does in automatic
    optimization. With gradient_clip_val at half the true norm the optimizer applies exactly that norm (clipping the
    scaled gradients gave the optimizer 2^-16 of it: the issue's 1.5e-5 for a norm of 0.424). 16-mixed on CPU is
    Lightning's MixedPrecision plugin with a CPU GradScaler (Lightning turns the `16-mixed` flag into bf16 there)."""
    from omegaconf import open_dict

    def first_norm(clip):
        cfg = cfg_factory(*RUN, "trainer.max_steps=3", "trainer.val_check_interval=3", "trainer.num_sanity_val_steps=0",
                          f"trainer.gradient_clip_val={'null' if clip is None else clip}")
        with open_dict(cfg):
            cfg.trainer.precision = None
            cfg.trainer.plugins = [{"_target_": "lightning.pytorch.plugins.precision.MixedPrecision",
                                    "precision": "16-mixed", "device": "cpu"}]
        rec = GradNorms()
        _, objs = train_with(cfg, rec)
        assert objs["trainer"].precision_plugin.scaler is not None and rec.norms
        return rec.norms[0]

    true_norm = first_norm(None)
    assert true_norm > 1e-3
    assert first_norm(true_norm / 2) == pytest.approx(true_norm / 2, rel=1e-3)


def test_a_run_records_the_values_it_used_not_the_nulls(cfg_factory, tmp_path):
    """loss=dapo's preset (conf/loss/dapo.yaml: token, grpo advantages, 0.28) and the KL estimator left null (the
    loss's: k3): the checkpoint's hyper-parameters, hparams.yaml and the W&B config hold the values the run used."""
    import yaml

    cfg = cfg_factory(*RUN, "loss=dapo", "logger=[csv,wandb]", "trainer.max_steps=2", "trainer.val_check_interval=2")
    assert cfg.algo.kl_estimator is None
    train_with(cfg)
    want = {"loss_type": "dapo", "loss_agg": "token", "advantage": "grpo", "clip_high": 0.28, "kl_estimator": "k3"}
    ckpt = torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=True)["hyper_parameters"]
    (hparams,) = tmp_path.glob("csv/version_*/hparams.yaml")
    (run,) = tmp_path.glob("wandb/offline-run-*")
    for where, algo in (("checkpoint", ckpt), ("hparams.yaml", yaml.safe_load(hparams.read_text())["algo"]),
                        ("W&B", leet(run, summary=True)["config"]["algo"])):
        assert {k: algo[k] for k in want} == want, where


def test_the_rl_math_imports_without_lightning():
    """src/rl/ (advantages, losses, KL, the planner, the recipe checks, the rollouts layer) is one floor below the
    modules: importing it loads neither Lightning nor the modules."""
    import subprocess
    import sys

    code = ("import sys; import genlight.rl.advantages, genlight.rl.loss, genlight.rl.planner, genlight.rl.recipe, "
            "genlight.rl.registry, genlight.rl.rollouts; "
            "bad = [m for m in sys.modules if m.split('.')[0] in ('lightning', 'pytorch_lightning') "
            "or m.startswith('genlight.lightning_modules')]; assert not bad, bad")
    from tests.helpers import ROOT

    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 0, r.stderr[-2000:]


def test_rl_table_reads_before_after_and_test_from_a_csv_run(tmp_path):
    """scripts/rl_table.py (the README's learning tables): before RL is scalerl/R0 (the pre-training validation),
    after is the last validation before the test, test is the test row; a run without csv metrics is named."""
    import csv
    import subprocess
    import sys

    from omegaconf import OmegaConf

    run = tmp_path / "run"
    (run / ".hydra").mkdir(parents=True)
    OmegaConf.save({"seed": 3, "data": {"source": {"tasks": [{"name": "spell_backward"}]}}}, run / ".hydra" / "config.yaml")
    (run / "csv" / "version_0").mkdir(parents=True)
    rows = [{"step": 0, "warm_start/exact_match": 0.5, "warm_start/steps": 160},
            {"step": 49, "val/pass@1": 0.25}, {"step": 99, "val/pass@1": 0.4},
            {"step": 149, "val/pass@1": 0.6, "scalerl/R0": 0.15}, {"step": 150, "test/pass@1": 0.55,
                                                                  "test/majority@k": 0.7}]
    with (run / "csv" / "version_0" / "metrics.csv").open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=sorted({k for r in rows for k in r}))
        w.writeheader()
        w.writerows(rows)
    script = Path(__file__).resolve().parents[1] / "scripts" / "rl_table.py"
    out = subprocess.run([sys.executable, str(script), str(tmp_path)], capture_output=True, text=True, check=True).stdout
    line = out.strip().splitlines()[-1]
    assert line.startswith("| spell_backward | 3 | 0.500, 160 | 0.150 | 0.600 | +45.0 | 0.550 | 0.700 |"), line
    # a multi-turn run names its environment; majority@k names its k (the run's val_num_samples)
    OmegaConf.save({"seed": 0, "data": {"source": {"_target_": "genlight.envs.calculator.CalculatorTask"}},
                    "algo": {"val_num_samples": 4, "env": {"environment": {"_target_": "genlight.envs.calculator.Calculator"}}}},
                   run / ".hydra" / "config.yaml")
    out = subprocess.run([sys.executable, str(script), str(run)], capture_output=True, text=True, check=True).stdout
    line = out.strip().splitlines()[-1]
    assert line.startswith("| CalculatorTask, env Calculator | 0 | 0.500, 160 |") and "| 0.700 (k=4) |" in line, line
    # --by KEY: the run's value of a config key in a first column (an estimator table's rows)
    out = subprocess.run([sys.executable, str(script), str(run), "--by", "algo.val_num_samples"], capture_output=True,
                         text=True, check=True).stdout.strip().splitlines()
    assert out[0].startswith("| `algo.val_num_samples` | task |") and out[-1].startswith("| 4 | CalculatorTask"), out
    (run / "csv" / "version_0" / "metrics.csv").unlink()
    bad = subprocess.run([sys.executable, str(script), str(run)], capture_output=True, text=True)
    assert bad.returncode != 0 and "no csv/version_*/metrics.csv (train with logger=csv)" in bad.stderr


def test_scalerl_table_groups_seeds_into_rows_with_their_spread_and_predictions(tmp_path):
    """scripts/scalerl_table.py: runs whose overrides differ only by seed are one row, named by the overrides not every
    run shares (none: the baseline); R0, A's mean and sd over seeds, the bootstrap error's median, the final pass rate
    and each seed's prediction error; --plot draws one panel per row."""
    import importlib.util

    from omegaconf import OmegaConf

    spec = importlib.util.spec_from_file_location("scalerl_table", Path(__file__).resolve().parents[1] / "scripts" / "scalerl_table.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    runs = []
    for i, (extra, seed, a, err) in enumerate([([], 0, 0.60, 0.01), ([], 1, 0.64, -0.02),
                                                (["algo.loss_type=dapo"], 0, 0.50, 0.03)]):
        run = tmp_path / str(i)
        (run / ".hydra").mkdir(parents=True)
        OmegaConf.save(OmegaConf.create(["experiment=scalerl", *extra, f"seed={seed}", "logger=csv"]),
                       run / ".hydra" / "overrides.yaml")
        points = [[0.0, 0.2], [1e12, 0.3 + seed / 10], [2e12, 0.4 + seed / 10], [3e12, 0.45 + seed / 10]]
        fit = {"A": a, "B": 1.0 + seed, "C_mid": 1e12, "A_se": 0.01 * (seed + 1), "R0": 0.2 + seed / 100,
               "prediction": {"error": err}, "points": points}
        (run / "scalerl_fit.json").write_text(json.dumps(fit))
        runs.append(run)
    lines = mod.table(*mod.group(runs)).splitlines()
    assert lines[:2] == ["Every row: `experiment=scalerl`", ""] and len(lines) == 6, lines
    assert lines[4] == ("| (baseline) | 2 | 0.205 ± 0.007 | 0.620 ± 0.028 | 0.015 | 1.50 ± 0.71 | 1.00e+12 ± 0.00e+00 | "
                        "0.500 ± 0.071 | +0.010, -0.020 |"), lines[4]
    assert lines[5] == "| `algo.loss_type=dapo` | 1 | 0.200 | 0.500 | 0.010 | 1.00 | 1.00e+12 | 0.450 | +0.030 |", lines[5]
    mod.plot(mod.group(runs)[1], tmp_path / "rows.png")
    from PIL import Image

    assert Image.open(tmp_path / "rows.png").size == (800, 320)  # two rows: two panels side by side
    with pytest.raises(SystemExit, match="no scalerl_fit.json"):
        mod.load(tmp_path / "missing")
    # --refit: a run saved with a stale fit is refitted from its points with this code
    from genlight.callbacks.scalerl_curve import sigmoid_curve

    c = np.linspace(0, 2e13, 21)
    r = np.r_[0.2, sigmoid_curve(c[1:], 0.2, 0.6, 1.5, 3e12)]
    stale = {"A": 0.9, "B": 9.0, "C_mid": 1.0, "A_se": 0.5, "R0": 0.2, "skip_fraction": 0.1,
             "points": [[float(x), float(y)] for x, y in zip(c, r)]}
    (runs[2] / "scalerl_fit.json").write_text(json.dumps(stale))
    _, fit = mod.load(runs[2], redo=True)
    assert fit["A"] == pytest.approx(0.6, abs=1e-3) and fit["A_se"] < 1e-3
    assert abs(fit["prediction"]["error"]) < 1e-3 and fit["prediction"]["fit_compute"] <= 1e13
