"""The checks of an RLVR recipe's options, before any work, each naming the key at fault; they fill in the loss type's
own defaults (`PRESETS`)."""

from __future__ import annotations

from genlight.rl.advantages import NORMALISATIONS
from genlight.rl.loss import AGGREGATIONS, LOSS_TYPES, PRESETS


def check_retirement(model_reward: bool, retire_threshold: float | None) -> None:
    if model_reward and retire_threshold is not None:
        raise ValueError(f"algo.retire_threshold={retire_threshold} retires prompts by their pass rate, which a "
                         "reward model does not give: set algo.retire_threshold=null (experiment=rlhf does)")


def check_recipe(reward, loss_type, loss_agg, adv_norm, clip_high, num_generations, generation_lag, epsilon,
                 reward_on_error, val_num_samples, temperature=1.0, top_p=1.0,
                 truncated_reward=0.0, clip_low=None) -> tuple[str, str, float | None, float | None]:
    """Validate the recipe's options (naming the key at fault); return loss_agg, adv_norm, clip_high and clip_low
    with the loss type's own defaults filled in."""
    if reward is None or not callable(reward):
        raise ValueError("algo.reward: a verifier is required (reward=exact|numeric|math|custom)")
    if loss_type not in LOSS_TYPES:
        raise ValueError(f"algo.loss_type={loss_type!r}: must be one of {list(LOSS_TYPES)}")
    preset = PRESETS[loss_type]
    agg, norm = loss_agg or preset["loss_agg"], adv_norm or preset["adv_norm"]
    if agg not in AGGREGATIONS:
        raise ValueError(f"algo.loss_agg={loss_agg!r}: must be one of {list(AGGREGATIONS)}")
    if norm not in NORMALISATIONS:
        raise ValueError(f"algo.adv_norm={adv_norm!r}: must be one of {list(NORMALISATIONS)}")
    checks = [
        (num_generations >= 2, f"algo.num_generations={num_generations}: group advantages need >= 2 samples"),
        (generation_lag >= 0, f"algo.generation_lag={generation_lag}: must be >= 0 (0 = on-policy)"),
        (epsilon > 0, f"algo.epsilon={epsilon}: must be > 0"),
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
    return (agg, norm, clip_high if clip_high is not None else preset["clip_high"],
            clip_low if clip_low is not None else preset["clip_low"])
