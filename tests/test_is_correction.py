"""Off-policy corrections of the sampler-trainer mismatch (`algo.is_correction`): the weights against a hand
computation, their place in the loss, and in a run the recompute of pi_old that separates the engine's mismatch
(corrected) from the generation lag (the loss's ratio). The vLLM case is in tests/test_vllm.py."""

from __future__ import annotations

import math

import pytest
import torch

from genlight.rl.loss import check_is_correction, is_weights, rlvr_loss
from tests.helpers import RLVR_RUN, train_with

# N = 3 samples, T = 3 tokens; lengths 3, 2, 1; log pi_old and log pi_rollout
MASK = torch.tensor([[1, 1, 1], [1, 1, 0], [1, 0, 0]], dtype=torch.bool)
OLD = torch.tensor([[-0.5, -1.0, -0.2], [-0.1, -0.3, 0.0], [-1.5, 0.0, 0.0]])
ROLL = torch.tensor([[-0.6, -0.2, -2.5], [-0.1, -0.5, 0.0], [-1.4, 0.0, 0.0]])
ADV = torch.tensor([1.0, -0.5, 2.0])


def _hand(correction, level, lo, hi):
    """Each token's weight, one float at a time: q per token or the product over its sequence."""
    out = torch.zeros_like(OLD)
    for i in range(3):
        toks = [t for t in range(3) if MASK[i, t]]
        seq = math.exp(sum(float(OLD[i, t] - ROLL[i, t]) for t in toks))
        for t in toks:
            q = seq if level == "sequence" else math.exp(float(OLD[i, t] - ROLL[i, t]))
            if correction == "tis":
                out[i, t] = min(max(q, lo if lo is not None else q), hi)
            else:
                out[i, t] = q if (lo is None or q >= lo) and q <= hi else 0.0
    return out


@pytest.mark.parametrize("correction,level,lo,hi", [
    ("tis", "token", None, 2.0), ("tis", "sequence", None, 2.0), ("tis", "token", None, 1.1), ("tis", "token", 0.9, 2.0),
    ("mis", "token", 0.5, 2.0), ("mis", "sequence", 0.5, 2.0), ("mis", "token", None, 1.1),
    ("icepop", "token", 0.5, 5.0),
])
def test_weights_equal_a_hand_computation(correction, level, lo, hi):
    w, stats = is_weights(OLD, ROLL, MASK, correction, level, lo, hi)
    torch.testing.assert_close(w, _hand(correction, level, lo, hi))
    # token 0,2 has q = exp(2.3) ~ 10: outside every band, so these inputs exercise each branch
    units = ([math.exp(float(OLD[i, t] - ROLL[i, t])) for i in range(3) for t in range(3) if MASK[i, t]]
             if level == "token" else
             [math.exp(sum(float(OLD[i, t] - ROLL[i, t]) for t in range(3) if MASK[i, t])) for i in range(3)])
    outside = [not ((lo is None or q >= lo) and q <= hi) for q in units]
    assert stats["sampling/raw_importance_ratio/mean"].item() == pytest.approx(sum(units) / len(units), rel=1e-5)
    assert stats["sampling/raw_importance_ratio/max"].item() == pytest.approx(max(units), rel=1e-5)
    frac = sum(outside) / len(units)
    assert stats["sampling/frac_masked"].item() == pytest.approx(0.0 if correction == "tis" else frac)
    assert stats["sampling/frac_truncated"].item() == pytest.approx(frac if correction == "tis" else 0.0)
    diffs = [abs(float(OLD[i, t] - ROLL[i, t])) for i in range(3) for t in range(3) if MASK[i, t]]
    assert stats["sampling/sampling_logp_difference/mean"].item() == pytest.approx(sum(diffs) / 6, rel=1e-5)


def test_without_a_correction_the_recompute_reports_the_mismatch_and_weighs_nothing():
    """`recompute_gen_logps` with no `is_correction`: no weight and no applied weights' statistics (TRL's
    `importance_sampling_ratio/*`), the same raw ratio and mismatch statistics as a correction's, nothing counted as
    masked or truncated."""
    w, stats = is_weights(OLD, ROLL, MASK, None, "token", None, None)
    _, tis = is_weights(OLD, ROLL, MASK, "tis", "token", None, 2.0)
    assert w is None
    assert not any(k.startswith("sampling/importance_sampling_ratio/") for k in stats)
    for key in ("raw_importance_ratio/mean", "raw_importance_ratio/max", "sampling_logp_difference/max"):
        assert stats[f"sampling/{key}"].item() == pytest.approx(tis[f"sampling/{key}"].item())
    assert stats["sampling/frac_truncated"].item() == 0.0 and tis["sampling/frac_truncated"].item() > 0
    assert stats["sampling/frac_masked"].item() == 0.0


def test_the_weight_multiplies_each_tokens_objective_without_a_gradient():
    """CISPO with a correction: - sum_t w_t sg(min(rho_t, eps)) A log pi_t / |tokens|; a masked token (w = 0) has
    no gradient at all, and w carries none (the gradient is w sg(min(rho, eps)) A per token)."""
    w, _ = is_weights(OLD, ROLL, MASK, "mis", "token", 0.5, 2.0)
    logp = (OLD + 0.05).clone().requires_grad_(True)
    loss, _ = rlvr_loss(logp, OLD, ADV, MASK, loss_type="cispo", loss_agg="token", epsilon=5.0, is_weight=w)
    loss.backward()
    rho = torch.exp(torch.tensor(0.05))
    want = -sum(float(w[i, t]) * float(rho) * float(ADV[i]) * float(OLD[i, t] + 0.05)
                for i in range(3) for t in range(3) if MASK[i, t]) / 6
    assert loss.item() == pytest.approx(want, rel=1e-5)
    grad = -(w * rho * ADV[:, None]) / 6
    torch.testing.assert_close(logp.grad, grad * MASK)
    assert w[0, 2] == 0 and logp.grad[0, 2] == 0


def _trl_loss(logp, old, ref, adv, mask, is_ratio, loss_type, beta, eps_low=0.2, eps_high=0.2):
    """TRL 1.16's GRPOTrainer._compute_loss itself on (N, T) log-probs, through a stand-in for the trainer's state it
    reads: vLLM's importance-sampling correction on (`inputs["importance_sampling_ratio"]`), k3 to the reference with
    `use_bias_correction_kl=False` (the KL as this project's loss defines it), one process, no accumulation."""
    import collections
    import types

    from trl.trainer.grpo_trainer import GRPOTrainer

    n, t = logp.shape
    fake = types.SimpleNamespace(
        _get_per_token_logps_and_entropies=lambda *a, **k: (logp, torch.zeros_like(logp), None),
        top_entropy_quantile=1.0, off_policy_mask_threshold=None, importance_sampling_level="token", beta=beta,
        loss_type=loss_type, epsilon_low=eps_low, epsilon_high=eps_high, use_vllm=True,
        vllm_importance_sampling_correction=True,
        args=types.SimpleNamespace(delta=None, use_bias_correction_kl=False, steps_per_generation=1),
        model=types.SimpleNamespace(training=True), current_gradient_accumulation_steps=1,
        _entropy_bonus_enabled=False, aux_loss_enabled=False,
        _metrics=collections.defaultdict(lambda: collections.defaultdict(list)),
        accelerator=types.SimpleNamespace(gather=lambda x: x, reduce=lambda x, reduction: x, num_processes=1))
    inputs = {"prompt_ids": torch.zeros(n, 1, dtype=torch.long), "prompt_mask": torch.ones(n, 1, dtype=torch.long),
              "completion_ids": torch.zeros(n, t, dtype=torch.long), "completion_mask": mask.long(),
              "advantages": adv, "old_per_token_logps": old, "ref_per_token_logps": ref,
              "importance_sampling_ratio": is_ratio, "num_items_in_batch": mask.sum().float()}
    return GRPOTrainer._compute_loss(fake, None, inputs)


REF = OLD - torch.tensor([[0.4, -0.3, 0.6], [0.2, 0.5, 0.0], [-0.7, 0.0, 0.0]])  # log pi_ref: d = log pi/pi_ref varies


@pytest.mark.parametrize("correction,lo,hi", [("tis", None, 2.0), ("mis", 0.5, 2.0)])
@pytest.mark.parametrize("loss_type,agg", [("cispo", "token"), ("grpo", "sequence")])
def test_the_correction_weighs_the_policy_term_and_not_the_kl_as_trl(correction, lo, hi, loss_type, agg):
    """beta > 0 with a correction: the loss and its gradient equal TRL's (`per_token_loss * importance_sampling_ratio`,
    then `+ beta * per_token_kl`) on the same tensors, at the first step after sampling (pi_train = pi_old, TRL's
    num_iterations=1). The token that mis masks (q = exp(2.3)) keeps the KL's gradient beta (1 - pi_ref/pi) / N; with
    the weight on the KL term too (the old place) it had none, and the loss moved."""
    w, _ = is_weights(OLD, ROLL, MASK, correction, "token", lo, hi)
    logp = OLD.clone().requires_grad_(True)
    loss, _ = rlvr_loss(logp[None], OLD[None], ADV[None], MASK[None], loss_type=loss_type, loss_agg=agg, epsilon=5.0,
                        clip_low=0.2, clip_high=0.2, ref_logp=REF[None], beta=0.1, is_weight=w[None])
    loss.backward()
    trl_logp = OLD.clone().requires_grad_(True)
    trl = _trl_loss(trl_logp, OLD, REF, ADV, MASK, w, loss_type, 0.1, eps_high=5.0 if loss_type == "cispo" else 0.2)
    trl.backward()
    assert loss.item() == pytest.approx(trl.item(), rel=1e-6)
    torch.testing.assert_close(logp.grad, trl_logp.grad, rtol=1e-6, atol=1e-8)
    if correction == "mis" and loss_type == "cispo":  # token (0, 2): masked, its KL gradient by hand
        d = float(OLD[0, 2] - REF[0, 2])
        assert w[0, 2] == 0 and logp.grad[0, 2].item() == pytest.approx(0.1 * (1 - math.exp(-d)) / 6, rel=1e-5)


@pytest.mark.parametrize("correction,level,lo,hi", [
    ("tis", "token", None, 2.0), ("tis", "sequence", None, 2.0), ("tis", "token", 0.9, 2.0),
    ("mis", "token", 0.5, 2.0), ("mis", "sequence", 0.5, 2.0), ("icepop", "token", 0.5, 5.0),
])
def test_importance_sampling_ratio_is_what_trl_logs_under_that_name(correction, level, lo, hi):
    """`sampling/importance_sampling_ratio/{min,mean,max}` are TRL's: the weights applied (after truncation or
    masking), over the completion tokens (a masked token's 0 included) or one per sequence, as TRL 1.16's
    `_generate_and_score_completions` computes them (transcribed below); the ratio before truncation or masking is
    `sampling/raw_importance_ratio/*`."""
    # TRL: per_token_logps_diff = (old - sampling) * mask; a sequence's sum; exp; clamp (*_truncate) or masked_fill 0
    # outside [C_min, C_max] (*_mask); then ratio[mask] (token) or ratio.flatten() (sequence)
    diff = (OLD - ROLL) * MASK
    ratio = torch.exp(diff.sum(-1, keepdim=True) if level == "sequence" else diff)
    if correction == "tis":
        ratio = torch.clamp(ratio, min=lo, max=hi)
    else:
        ratio = ratio.masked_fill((ratio < (lo if lo is not None else -math.inf)) | (ratio > hi), 0.0)
    flat = ratio.flatten() if level == "sequence" else ratio[MASK]
    raw = torch.exp(diff.sum(-1) if level == "sequence" else diff[MASK])
    _, stats = is_weights(OLD, ROLL, MASK, correction, level, lo, hi)
    got = {k: stats[f"sampling/importance_sampling_ratio/{k}"].item() for k in ("min", "mean", "max")}
    assert got == pytest.approx({"min": flat.min().item(), "mean": flat.mean().item(), "max": flat.max().item()},
                                rel=1e-6)
    got = {k: stats[f"sampling/raw_importance_ratio/{k}"].item() for k in ("min", "mean", "max")}
    assert got == pytest.approx({"min": raw.min().item(), "mean": raw.mean().item(), "max": raw.max().item()}, rel=1e-6)


@pytest.mark.parametrize("args,match", [
    (("ppo", "token", None, None), "algo.is_correction='ppo'"),
    (("tis", "batch", None, None), "algo.is_level='batch'"),
    (("icepop", "sequence", None, None), "IcePop is token-level"),
    (("mis", "token", 2.0, 1.5), "is_cap_low < is_cap_high"),
])
def test_bad_options_name_the_key(args, match):
    with pytest.raises(ValueError, match=match):
        check_is_correction(*args)


def test_presets_are_the_sources_bounds():
    assert check_is_correction("tis", "token", None, None) == (None, 2.0)
    assert check_is_correction("mis", "sequence", None, None) == (0.5, 2.0)
    assert check_is_correction("icepop", "token", None, None) == (0.5, 5.0)
    assert check_is_correction(None, "token", None, None) == (None, None)


DELTA = 0.5  # the engine's reported log-probs, lowered by this much on every token: q = exp(DELTA) per token


@pytest.fixture
def biased_engine(monkeypatch):
    """HFRollout whose log-probs are off by -DELTA: an engine mismatch of known size (the weights that sampled are
    the trainer's, so pi_old is the sampler's true distribution)."""
    from genlight.models.rollout import HFRollout

    generate = HFRollout.generate

    def biased(self, *a, **k):
        roll = generate(self, *a, **k)
        roll.logps = roll.logps - DELTA * roll.loss_mask
        return roll

    monkeypatch.setattr(HFRollout, "generate", biased)


class Initial:
    """The policy's weights when training starts."""

    def __init__(self):
        import lightning as L

        outer = self

        class Cb(L.Callback):
            def on_train_start(self, trainer, module):
                outer.weights = {k: v.clone() for k, v in module.model.state_dict().items()}

        self.callback = Cb()


def _run(cfg_factory, *extra, steps=3, initial=None):
    cfg = cfg_factory(*RLVR_RUN, f"trainer.max_steps={steps}", "trainer.val_check_interval=null",
                      "+trainer.limit_val_batches=0", "algo.generation_lag=0", "algo.loss_type=cispo", *extra)
    _, objs = train_with(cfg, *([initial.callback] if initial else []))
    return objs["module"], {k: float(v) for k, v in objs["trainer"].callback_metrics.items() if v.numel() == 1}


def test_recompute_separates_the_mismatch_from_the_lag_and_tis_weighs_it(cfg_factory, biased_engine):
    """On-policy (lag 0): with pi_old recomputed, the loss's ratio pi_train / pi_old is 1 and the mismatch
    (exp(DELTA) per token) is all in train/sampling/*; without the recompute, rho itself carries it."""
    _, m = _run(cfg_factory, "algo.is_correction=tis", "algo.is_cap_high=10")
    assert m["train/sampling/sampling_logp_difference/mean"] == pytest.approx(DELTA, abs=1e-4)
    assert m["train/sampling/importance_sampling_ratio/mean"] == pytest.approx(math.exp(DELTA), rel=1e-4)
    assert m["train/sampling/frac_truncated"] == 0.0
    assert m["train/rho/mean"] == pytest.approx(1.0, abs=1e-4)
    _, plain = _run(cfg_factory)
    assert plain["train/rho/mean"] == pytest.approx(math.exp(DELTA), rel=1e-3)
    assert "train/sampling/importance_sampling_ratio/mean" not in plain


def _moved(module, initial):
    return [k for k, v in module.model.state_dict().items() if not torch.equal(v, initial.weights[k])]


def test_masked_is_drops_every_token_outside_its_band(cfg_factory, biased_engine):
    """mis with C_high below exp(DELTA): every token is masked, the loss and its gradient are 0 and the policy does
    not move (Adam without weight decay: a zero gradient is no step); with the band around exp(DELTA) it moves."""
    initial = Initial()
    module, m = _run(cfg_factory, "algo.is_correction=mis", "algo.is_cap_high=1.5", initial=initial)
    assert m["train/sampling/frac_masked"] == 1.0
    assert _moved(module, initial) == []
    module, m = _run(cfg_factory, "algo.is_correction=mis", "algo.is_cap_high=2.0", initial=initial)
    assert m["train/sampling/frac_masked"] == 0.0
    assert _moved(module, initial)


def test_recompute_adds_pi_olds_forward_pass_to_the_compute(cfg_factory):
    """train/compute_flops: 2 N per prefilled or generated token and 6 N per trained one (8 N per token: each prompt
    is encoded once for its samples, in sampling and in training alike), + 2 N per token of pi_old's recompute."""
    a, ma = _run(cfg_factory, steps=1)
    b, mb = _run(cfg_factory, "algo.recompute_gen_logps=true", steps=1)  # step 1: the same samples
    assert b.hparams.recompute_gen_logps and not a.hparams.recompute_gen_logps
    assert mb["train/compute_flops"] == pytest.approx(ma["train/compute_flops"] * 10 / 8, rel=1e-9)
