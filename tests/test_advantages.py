"""Advantage estimators and policy losses by name (src/rl/advantages.py, src/rl/loss.py, conf/loss/): each estimator
against a hand computation on stored rewards and, where TRL or OpenRLHF implement it, against their formula; Dr.
GRPO's constant normaliser against TRL's loss; a loss and an estimator registered in a test train through the config
with nothing else changed."""

from __future__ import annotations

import dataclasses
import math
import statistics

import pytest
import torch
from lightning.pytorch.callbacks import Callback

from genlight.rl.advantages import ADVANTAGES, compute_advantages, register_advantage, zero_variance
from genlight.rl.loss import POLICY_LOSSES, PolicyTerm, register_policy_loss, rlvr_loss
from tests.helpers import RLVR_RUN, train_with
from tests.helpers.trl import trl_grpo_loss

# 4 prompts x G = 4: binary groups, a tied group (dropped by the filter) and a graded one
REWARDS = [[1.0, 0.0, 0.0, 1.0], [1.0, 1.0, 1.0, 0.0], [0.0, 0.0, 0.0, 0.0], [0.2, 0.9, 0.5, 0.1]]
LENGTHS = [[3, 5, 2, 4], [1, 2, 3, 4], [6, 6, 6, 6], [7, 1, 1, 2]]
KEPT = [0, 1, 3]  # the groups whose rewards differ


def _hand(name: str) -> list[list[float]]:
    """Each estimator one float at a time (statistics.stdev: Bessel; pvariance: biased)."""
    out = [[0.0] * 4 for _ in REWARDS]
    centred = {b: [r - statistics.fmean(REWARDS[b]) for r in REWARDS[b]] for b in KEPT}
    if name == "scalerl":
        std = statistics.stdev([a for b in KEPT for a in centred[b]])
        for b in KEPT:
            out[b] = [a / (std + 1e-6) for a in centred[b]]
    elif name == "grpo":
        for b in KEPT:
            out[b] = [a / (statistics.stdev(REWARDS[b]) + 1e-6) for a in centred[b]]
    elif name == "dr_grpo":
        for b in KEPT:
            out[b] = centred[b]
    elif name == "rloo":  # r_i minus the mean of the other three
        for b in KEPT:
            out[b] = [REWARDS[b][i] - sum(REWARDS[b][j] for j in range(4) if j != i) / 3 for i in range(4)]
    else:  # REINFORCE++: each sample's value repeated once per completion token, whitened over them
        value = {b: centred[b] if name == "reinforce_pp_baseline" else REWARDS[b] for b in KEPT}
        tokens = [value[b][i] for b in KEPT for i in range(4) for _ in range(LENGTHS[b][i])]
        mu, var = statistics.fmean(tokens), statistics.pvariance(tokens)
        for b in KEPT:
            out[b] = [(v - mu) / math.sqrt(var) for v in value[b]]
    return out


@pytest.mark.parametrize("name", ["scalerl", "grpo", "dr_grpo", "rloo", "reinforce_pp", "reinforce_pp_baseline"])
def test_each_estimator_matches_a_hand_computation(name):
    r = torch.tensor(REWARDS)
    keep = ~zero_variance(r)
    assert keep.tolist() == [True, True, False, True]
    got = compute_advantages(name, r, keep, torch.tensor(LENGTHS))
    for b in range(4):
        assert got[b].tolist() == pytest.approx(_hand(name)[b], abs=1e-5), (name, b)


def test_rloo_is_trls_leave_one_out_baseline():
    """TRL 1.16 RLOOTrainer (normalize_advantages=False): baseline = (the group's sum - r_i) / (G - 1), A = r - baseline;
    equal to G / (G - 1) times the group-centred reward."""
    r = torch.tensor(REWARDS)
    grouped_sum = r.sum(1, keepdim=True)
    trl = r - (grouped_sum - r) / (r.size(1) - 1)
    got = compute_advantages("rloo", r)
    assert torch.allclose(got, trl, atol=1e-6)
    assert torch.allclose(got, 4 / 3 * (r - r.mean(1, keepdim=True)), atol=1e-6)


def test_reinforce_pp_whitens_as_openrlhf_over_the_batchs_tokens():
    """OpenRLHF's REINFORCE++ (the paper's authors' code): every action token carries its sample's return r (gamma 1,
    no KL), then `masked_normalize`: mean and biased variance over the action mask, (A - mean) * rsqrt(var.clamp(1e-8)).
    Lengths differ, so a per-sample whitening would give other numbers (checked below)."""
    r = torch.tensor(REWARDS)
    lengths = torch.tensor(LENGTHS)
    t = int(lengths.max())
    action_mask = (torch.arange(t) < lengths.view(-1, 1)).float()  # (16, T)
    returns = r.view(-1, 1) * action_mask
    mean = (returns * action_mask).sum() / action_mask.sum()
    var = (((returns - mean) ** 2) * action_mask).sum() / action_mask.sum()
    openrlhf = ((returns - mean) * var.clamp(min=1e-8).rsqrt())[:, 0].view(4, 4)  # one value per sample
    got = compute_advantages("reinforce_pp", r, None, lengths)
    assert torch.allclose(got, openrlhf, atol=1e-6)
    per_sample = (r - r.mean()) / r.std(unbiased=False)
    assert not torch.allclose(got, per_sample, atol=1e-3)


def test_dropped_groups_get_no_advantage_and_leave_the_batch_statistics():
    """A tied group is 0 for every estimator, and the batch-level ones (scalerl, reinforce_pp) do not count it: the
    kept groups' advantages are those of the batch without it."""
    r = torch.tensor(REWARDS)
    keep = ~zero_variance(r)
    lengths = torch.tensor(LENGTHS)
    for name in ("scalerl", "grpo", "dr_grpo", "rloo", "reinforce_pp", "reinforce_pp_baseline"):
        got = compute_advantages(name, r, keep, lengths)
        assert torch.equal(got[2], torch.zeros(4)), name
        alone = compute_advantages(name, r[keep], None, lengths[keep])
        assert torch.allclose(got[keep], alone, atol=1e-6), name


def test_dr_grpo_loss_is_trls_constant_normaliser():
    """loss=dr_grpo (the clipped ratio, loss_agg=constant over the generation budget L): by hand, sum over all tokens /
    (N L) with N every sample of the step, a group the filter drops included (A = 0), and TRL's loss_type="dr_grpo"
    on the same inputs; unlike the per-sample mean (`sequence`)."""
    torch.manual_seed(0)
    n, t, budget = 9, 5, 8
    logp = -torch.rand(n, t) * 2
    logp_gen = logp + 0.3 * torch.randn(n, t)
    mask = torch.arange(t) < torch.tensor([5, 1, 3, 2, 4, 5, 3, 3, 1]).view(-1, 1)
    r = torch.tensor([[1.0, 0.0, 0.0], [1.0, 1.0, 1.0], [0.2, 0.7, 0.4]])  # the second group ties
    keep = ~zero_variance(r)
    adv = compute_advantages("dr_grpo", r, keep).flatten()
    shaped = (logp.view(3, 3, t), logp_gen.view(3, 3, t), adv.view(3, 3), mask.view(3, 3, t))
    ours, _ = rlvr_loss(*shaped, keep, loss_type="grpo", loss_agg="constant", max_len=budget)
    rho = torch.exp(logp - logp_gen)
    per_token = -torch.minimum(rho * adv[:, None], rho.clamp(0.8, 1.2) * adv[:, None])
    assert ours.item() == pytest.approx(float((per_token * mask).sum() / (n * budget)), rel=1e-6)
    assert ours.item() == pytest.approx(float(trl_grpo_loss(logp, logp_gen, adv, mask, loss_type="dr_grpo",
                                                                   max_completion_length=budget)), rel=1e-6)
    per_sample, _ = rlvr_loss(*shaped, keep, loss_type="grpo", loss_agg="sequence")
    assert abs(per_sample.item() - ours.item()) > 1e-3
    with pytest.raises(ValueError, match="loss_agg=constant"):
        rlvr_loss(*shaped, loss_agg="constant")


def test_every_rlvr_experiment_takes_each_loss_preset_whole(cfg_factory):
    """`loss=X` sets the six keys of conf/loss/X.yaml in every experiment (none overrides a piece of it), and the
    module records them."""
    import yaml

    from tests.helpers import ROOT

    presets = {p.stem: yaml.safe_load(p.read_text()) for p in sorted((ROOT / "conf" / "loss").glob("*.yaml"))}
    assert set(presets) == {"cispo", "grpo", "dapo", "gspo", "dr_grpo"}
    experiments = [p.stem for p in sorted((ROOT / "conf" / "experiment").glob("*.yaml"))]
    checked = 0
    for exp in experiments:
        if not cfg_factory(f"experiment={exp}", quick=False).algo._target_.endswith("RLVRModule"):
            continue
        for name, preset in presets.items():
            algo = cfg_factory(f"experiment={exp}", f"loss={name}", quick=False).algo
            assert {k: algo[k] for k in preset} == preset, (exp, name)
            checked += 1
    assert checked >= 5 * 5


def test_reinforce_pp_says_when_the_filter_drops_tied_groups(cfg_factory):
    from genlight.pipeline import build

    with pytest.warns(UserWarning, match="zero_variance_filter=false keeps them"):
        build(cfg_factory(*RLVR_RUN, "algo.advantage=reinforce_pp"), warm_start=False)


def test_unknown_names_stop_listing_the_registered_ones(cfg_factory):
    with pytest.raises(ValueError, match=r"algo.advantage='rlooo'.*'dr_grpo'.*'rloo'"):
        compute_advantages("rlooo", torch.tensor(REWARDS))
    with pytest.raises(ValueError, match=r"algo.loss_type='ppo'.*'cispo'.*'gspo'"):
        rlvr_loss(torch.zeros(1, 2, 1), torch.zeros(1, 2, 1), torch.zeros(1, 2), torch.ones(1, 2, 1, dtype=torch.bool),
                  loss_type="ppo")
    from genlight.lightning_modules.rlvr import RLVRModule

    for key, bad in (("algo.advantage", "rlooo"), ("algo.loss_type", "ppo")):  # before any work: the config's check
        with pytest.raises(ValueError, match=f"{key}='{bad}'"):
            RLVRModule.check_config(cfg_factory(*RLVR_RUN, f"{key}={bad}"))


def test_the_recipe_is_one_typed_object_checked_when_built_and_recorded_flat(tokenizer):
    """`RLVRModule` takes the recipe as a `Recipe` and/or its fields by keyword (the YAML's flat keys, over the
    object's); the module's hyper-parameters (what a checkpoint rebuilds it from) hold the resolved values, flat."""
    from genlight import Recipe, RLVRModule, tiny_llama

    def net():
        return tiny_llama(tokenizer, hidden_size=16, num_layers=1, num_heads=2, intermediate_size=32)

    module = RLVRModule(net(), tokenizer, recipe=Recipe(loss_type="grpo", clip_high=0.28, is_correction="tis"),
                        clip_high=0.3, generation_lag=0, lr=3e-4)
    r = module.recipe
    assert (r.loss_type, r.clip_high, r.generation_lag, r.advantage) == ("grpo", 0.3, 0, "scalerl")
    # the nulls resolved: the place's own KL estimator, tis's upper bound, pi_old recomputed for the correction
    assert (r.kl_estimator, r.is_cap_high, r.recompute_gen_logps) == ("k3", 2.0, True)
    assert "recipe" not in module.hparams and module.hparams.lr == 3e-4
    assert {k: module.hparams[k] for k in dataclasses.asdict(r)} == dataclasses.asdict(r)
    again = RLVRModule(net(), tokenizer, **module.hparams)  # as load_from_checkpoint rebuilds it
    assert again.recipe == r
    # the options apply over the recipe as given, its nulls resolved after: another correction's bounds, not tis's
    mixed = RLVRModule(net(), tokenizer, recipe=Recipe(is_correction="tis"), is_correction="icepop").recipe
    assert (mixed.is_cap_low, mixed.is_cap_high, mixed.recompute_gen_logps) == (0.5, 5.0, True)
    plain = RLVRModule(net(), tokenizer, recipe=Recipe(is_correction="tis"), is_correction=None).recipe
    assert (plain.is_cap_high, plain.recompute_gen_logps) == (None, False)
    with pytest.raises(ValueError, match="algo.reward=1.0: a verifier is required"):
        RLVRModule(net(), tokenizer, reward=1.0)
    with pytest.raises(TypeError, match=r"unknown options \['clip_hi'\]"):
        RLVRModule(net(), tokenizer, clip_hi=0.3)
    with pytest.raises(ValueError, match="algo.clip_low=1.0"):
        Recipe(clip_low=1.0)
    with pytest.raises(ValueError, match="algo.micro_batch_size=0"):
        Recipe(micro_batch_size=0)
    with pytest.raises(ValueError, match="algo.kl_estimator=k1 as a loss term"):
        Recipe(kl_estimator="k1")


def halved_rloo(rewards, keep, lengths):
    """An estimator of a user's module, reached by its dotted path."""
    return 0.5 * (rewards - (rewards.sum(-1, keepdim=True) - rewards) / (rewards.size(-1) - 1))


def test_a_dotted_path_reaches_a_users_function_from_the_command_line(cfg_factory):
    from genlight.lightning_modules.rlvr import RLVRModule

    r = torch.tensor(REWARDS)
    try:
        got = compute_advantages("tests.test_advantages.halved_rloo", r)
        assert torch.allclose(got, 0.5 * compute_advantages("rloo", r))
        RLVRModule.check_config(cfg_factory(*RLVR_RUN, "algo.advantage=tests.test_advantages.halved_rloo"))
        with pytest.raises(ValueError, match="algo.loss_type='tests.nowhere.fn': cannot import"):
            RLVRModule.check_config(cfg_factory(*RLVR_RUN, "algo.loss_type=tests.nowhere.fn"))
    finally:
        ADVANTAGES.pop("tests.test_advantages.halved_rloo", None)


def test_a_registered_loss_and_estimator_train_through_the_config_alone(cfg_factory):
    """One decorated function each, chosen by `algo.loss_type=` / `algo.advantage=` with nothing else changed: the
    step's tensors reach them, and what they return drives the update (a loss with no gradient leaves the policy
    as it was, the plain policy gradient moves it)."""
    calls = {"loss": 0, "adv": 0}

    @register_policy_loss("test_pg")
    def plain_pg(logp, logp_gen, adv, mask, options):  # REINFORCE: A log pi, no ratio
        calls["loss"] += 1
        assert logp.shape == logp_gen.shape == mask.shape and adv.shape == logp.shape[:1]
        return PolicyTerm(adv.unsqueeze(-1) * logp, torch.ones_like(logp), torch.zeros_like(mask))

    @register_policy_loss("test_still")
    def still(logp, logp_gen, adv, mask, options):
        return PolicyTerm(0.0 * logp, torch.ones_like(logp), torch.zeros_like(mask))

    @register_advantage("test_sign")
    def sign(rewards, keep, lengths):  # +-1 around the group mean
        calls["adv"] += 1
        return torch.sign(rewards - rewards.mean(-1, keepdim=True))

    class Snapshot(Callback):
        def on_train_start(self, trainer, module):
            self.start = {k: v.detach().clone() for k, v in module.model.state_dict().items()}

    try:
        run = [*RLVR_RUN, "trainer.max_steps=2", "trainer.val_check_interval=2", "algo.warmup_steps=0",
               "algo.generation_lag=0", "algo.weight_decay=0"]
        moved = {}
        for loss in ("test_pg", "test_still"):
            snap = Snapshot()
            _, objs = train_with(cfg_factory(*run, f"algo.loss_type={loss}", "algo.advantage=test_sign"), snap)
            module = objs["module"]
            assert module.hparams.loss_type == loss and module.hparams.advantage == "test_sign"
            end = module.model.state_dict()
            moved[loss] = max(float((end[k] - v).abs().max()) for k, v in snap.start.items())
        assert calls["adv"] == 4 and calls["loss"] >= 2  # 2 steps a run; the loss once more a step for its statistics
        assert moved["test_still"] == 0.0 and moved["test_pg"] > 1e-4, moved
    finally:
        for name in ("test_pg", "test_still"):
            POLICY_LOSSES.pop(name, None)
        ADVANTAGES.pop("test_sign", None)
