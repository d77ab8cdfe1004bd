"""The checks of an RLVR recipe's options, before any work, each naming the key at fault. The papers' recipes (a loss
with its advantage, aggregation and clip range) are YAML presets in conf/loss/, not filled in here."""

from __future__ import annotations

import warnings

from genlight.rl.advantages import check_advantage
from genlight.rl.loss import AGGREGATIONS, check_policy_loss


def check_retirement(model_reward: bool, retire_threshold: float | None) -> None:
    if model_reward and retire_threshold is not None:
        raise ValueError(f"algo.retire_threshold={retire_threshold} retires prompts by their pass rate, which a "
                         "reward model does not give: set algo.retire_threshold=null (experiment=rlhf does)")


def check_recipe(reward, *, loss_type, loss_agg, advantage, clip_low, clip_high, num_generations, generation_lag,
                 epsilon, reward_on_error, val_num_samples, temperature=1.0, top_p=1.0, truncated_reward=0.0,
                 zero_variance_filter=True) -> None:
    """Validate the recipe's options, naming the key at fault (an unknown loss or estimator lists the registered
    ones)."""
    if reward is None or not callable(reward):
        raise ValueError("algo.reward: a verifier is required (reward=exact|numeric|math|custom)")
    check_policy_loss(loss_type)
    check_advantage(advantage)
    if loss_agg not in AGGREGATIONS:
        raise ValueError(f"algo.loss_agg={loss_agg!r}: must be one of {list(AGGREGATIONS)}")
    checks = [
        (num_generations >= 2, f"algo.num_generations={num_generations}: group advantages need >= 2 samples"),
        (generation_lag >= 0, f"algo.generation_lag={generation_lag}: must be >= 0 (0 = on-policy)"),
        (epsilon > 0, f"algo.epsilon={epsilon}: must be > 0"),
        (0 <= clip_low < 1 and clip_high >= 0, f"algo.clip_low={clip_low}, algo.clip_high={clip_high}: the ratio's range "
                                               "[1 - clip_low, 1 + clip_high] needs 0 <= clip_low < 1, clip_high >= 0"),
        (reward_on_error in ("raise", "zero"), f"algo.reward_on_error={reward_on_error!r}: must be 'raise' or 'zero'"),
        (val_num_samples >= 1, f"algo.val_num_samples={val_num_samples}: must be >= 1"),
        (temperature > 0, f"algo.temperature={temperature}: RL samples a group of different completions and trains "
                          "on their tempered log-probs; it must be > 0"),
        (top_p == 1.0, f"algo.top_p={top_p}: a nucleus sampler draws from the truncated distribution while the trainer "
                       "scores the full one, so every importance weight pi_train / pi_gen would be <= 1 and biased; "
                       "RL samples with algo.top_p=1.0 (sharpen with algo.temperature instead)"),
        (truncated_reward is None or truncated_reward == "min" or isinstance(truncated_reward, int | float),
         f"algo.truncated_reward={truncated_reward!r}: a number (in the reward's raw units), min (the step's lowest "
         "reward) or null"),
    ]
    for ok, message in checks:
        if not ok:
            raise ValueError(message)
    if advantage in ("reinforce_pp", "reinforce_pp_baseline") and zero_variance_filter:
        warnings.warn(f"algo.advantage={advantage} with algo.zero_variance_filter=true: groups whose rewards tie leave "
                      "the batch (dynamic filtering), where REINFORCE++ (OpenRLHF) whitens over every sample and a tied "
                      "group without a group baseline still carries a signal; algo.zero_variance_filter=false keeps "
                      "them", stacklevel=3)
