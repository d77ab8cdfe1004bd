"""An RLVR recipe's options as one typed object (`Recipe`), checked when it is built, each error naming the key at
fault. Its fields are conf/algo/rlvr.yaml's keys under `algo.` (where each is explained beside its value); the papers'
combinations of a loss with its advantage, aggregation and clip range are YAML presets in conf/loss/."""

from __future__ import annotations

import dataclasses
import warnings
from dataclasses import dataclass

from genlight.rl.advantages import check_advantage
from genlight.rl.loss import AGGREGATIONS, check_is_correction, check_policy_loss, kl_options
from genlight.rl.rollouts import check_micro_batches


@dataclass(frozen=True)
class Recipe:
    """What an `RLVRModule` samples, how it weighs and filters what it sampled, and what passes. The defaults are
    ScaleRL's (conf/algo/rlvr.yaml, conf/loss/cispo.yaml).

    sampling: num_generations (G, the samples of each prompt), max_new_tokens, temperature, top_p, seed (the noise's;
        a resumed run draws the same), generation_lag (pi_gen is refreshed every k optimizer steps; 0: on-policy).
    the objective: loss_type (a registered policy loss, `genlight.rl.loss.POLICY_LOSSES`), advantage (a registered
        estimator, `genlight.rl.advantages.ADVANTAGES`), loss_agg, epsilon (CISPO's cap), clip_low / clip_high (the
        clipped ratio's range); beta, kl_in, kl_estimator, ref_pretrained: the KL to a frozen reference (beta 0: none);
        entropy_coef: an entropy bonus (0: none).
    the sampler-trainer mismatch: is_correction, is_level, is_cap_low, is_cap_high, recompute_gen_logps.
    which groups and prompts train, what passes: zero_variance_filter, retire_threshold, pass_threshold,
        truncated_reward, reward_on_error.
    held-out: val_num_samples, val_temperature (pass@k, majority@k); log_completions_every_n_steps.
    memory: micro_batch_size, max_tokens_per_micro_batch (the step's samples in micro-batches).

    Built, it holds the values as given (a null chooses the default of the option it depends on); `resolved()` is the
    recipe the run uses, those nulls filled in (the KL estimator, the correction's bounds, pi_old's recomputation): the
    module's `recipe`, and what the checkpoint, hparams.yaml and the W&B config record."""

    num_generations: int = 8
    max_new_tokens: int = 8
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int = 42
    generation_lag: int = 8
    loss_type: str = "cispo"
    loss_agg: str = "prompt"
    advantage: str = "scalerl"
    epsilon: float = 5.0
    clip_low: float = 0.2
    clip_high: float = 0.2
    beta: float = 0.0
    kl_in: str = "loss"
    kl_estimator: str | None = None
    ref_pretrained: str | None = None
    entropy_coef: float = 0.0
    is_correction: str | None = None
    is_level: str = "token"
    is_cap_low: float | None = None
    is_cap_high: float | None = None
    recompute_gen_logps: bool = False
    zero_variance_filter: bool = True
    retire_threshold: float | None = 0.9
    pass_threshold: float = 1.0
    truncated_reward: float | str | None = 0.0
    reward_on_error: str = "raise"
    val_num_samples: int = 8
    val_temperature: float = 1.0
    log_completions_every_n_steps: int = 50
    micro_batch_size: int | None = None
    max_tokens_per_micro_batch: int | None = None

    @classmethod
    def pick(cls, options: dict) -> tuple[Recipe, dict]:
        """(the Recipe of the recipe's keys in `options`, the other keys)."""
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in options.items() if k in names}), {k: v for k, v in options.items()
                                                                         if k not in names}

    def __post_init__(self) -> None:
        check_policy_loss(self.loss_type)  # a registered name (a user's own registers on import), else the list
        check_advantage(self.advantage)
        checks = [
            (self.loss_agg in AGGREGATIONS, f"algo.loss_agg={self.loss_agg!r}: must be one of {list(AGGREGATIONS)}"),
            (self.num_generations >= 2, f"algo.num_generations={self.num_generations}: group advantages need >= 2 "
                                        "samples"),
            (self.generation_lag >= 0, f"algo.generation_lag={self.generation_lag}: must be >= 0 (0 = on-policy)"),
            (self.epsilon > 0, f"algo.epsilon={self.epsilon}: must be > 0"),
            (self.entropy_coef >= 0, f"algo.entropy_coef={self.entropy_coef}: must be >= 0 (0: no entropy bonus)"),
            (0 <= self.clip_low < 1 and self.clip_high >= 0,
             f"algo.clip_low={self.clip_low}, algo.clip_high={self.clip_high}: the ratio's range "
             "[1 - clip_low, 1 + clip_high] needs 0 <= clip_low < 1, clip_high >= 0"),
            (self.reward_on_error in ("raise", "zero"),
             f"algo.reward_on_error={self.reward_on_error!r}: must be 'raise' or 'zero'"),
            (self.val_num_samples >= 1, f"algo.val_num_samples={self.val_num_samples}: must be >= 1"),
            (self.temperature > 0, f"algo.temperature={self.temperature}: RL samples a group of different completions "
                                   "and trains on their tempered log-probs; it must be > 0"),
            (self.top_p == 1.0, f"algo.top_p={self.top_p}: a nucleus sampler draws from the truncated distribution "
                                "while the trainer scores the full one, so every importance weight pi_train / pi_gen "
                                "would be <= 1 and biased; RL samples with algo.top_p=1.0 (sharpen with "
                                "algo.temperature instead)"),
            (self.truncated_reward is None or self.truncated_reward == "min"
             or isinstance(self.truncated_reward, int | float),
             f"algo.truncated_reward={self.truncated_reward!r}: a number (in the reward's raw units), min (the step's "
             "lowest reward) or null"),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(message)
        check_micro_batches(self.micro_batch_size)
        kl_options(self.kl_in, self.kl_estimator)
        check_is_correction(self.is_correction, self.is_level, self.is_cap_low, self.is_cap_high)

    def resolved(self) -> Recipe:
        """The recipe the run uses: each null that chooses a default replaced by that default (the same options give the
        same run). Warns where an option combination departs from its paper."""
        if self.advantage in ("reinforce_pp", "reinforce_pp_baseline") and self.zero_variance_filter:
            warnings.warn(f"algo.advantage={self.advantage} with algo.zero_variance_filter=true: groups whose rewards "
                          "tie leave the batch (dynamic filtering), where REINFORCE++ (OpenRLHF) whitens over every "
                          "sample and a tied group without a group baseline still carries a signal; "
                          "algo.zero_variance_filter=false keeps them", stacklevel=3)
        caps = check_is_correction(self.is_correction, self.is_level, self.is_cap_low, self.is_cap_high)
        return dataclasses.replace(self, kl_estimator=kl_options(self.kl_in, self.kl_estimator), is_cap_low=caps[0],
                                   is_cap_high=caps[1],  # a correction weighs pi_old / pi_rollout: pi_old recomputed
                                   recompute_gen_logps=self.recompute_gen_logps or self.is_correction is not None)


def check_retirement(model_reward: bool, retire_threshold: float | None) -> None:
    if model_reward and retire_threshold is not None:
        raise ValueError(f"algo.retire_threshold={retire_threshold} retires prompts by their pass rate, which a "
                         "reward model does not give: set algo.retire_threshold=null (experiment=rlhf does)")
