"""RL with verifiable rewards, following ScaleRL (Khatri et al. 2025, "The Art of Scaling
Reinforcement Learning Compute for LLMs"), the lecture's objective:

    J(theta) = E_{x ~ D, {y_i}_{i=1..G} ~ pi_gen(.|x)} [ 1 / sum_g |y_g|
               * sum_i sum_t sg(min(rho_{i,t}, eps)) * A_i^norm * log pi_train(y_{i,t}) ]

    rho_{i,t} = pi_train(y_{i,t}) / pi_gen(y_{i,t})       (truncated importance sampling, CISPO)
    A_i = r_i - mean_group(r),   A_i^norm = A_i / std_batch(A)   (batch-level normalisation)
    kept only if the group's rewards are not all equal      (zero-variance filtering)
    and pass_rate(x) < 0.9                                  (no-positive resampling)

Zero-variance filtering drops the policy-gradient term of groups whose rewards (the verifier's or reward model's,
before any KL penalty) tie, and averages over the kept groups; never the KL term: with beta > 0 every group keeps
its pull to pi_ref and the loss averages over all groups (a per-step rescaling of the reward term by N / N_kept
would move the KL-regularised optimum). With `kl_in=reward` a tied group's advantage is its KL part alone, so it
stays in the loss.

pi_gen is a copy of the policy refreshed every `generation_lag` optimizer steps (ScaleRL's
PipelineRL-8 keeps the generators about 8 steps behind the trainer), so rho differs from 1.
Variants to compare (`loss_type`):
    cispo  the objective above (MiniMax-M1's CISPO, ScaleRL's choice)
    grpo   PPO's clipped ratio, min(rho A, clip(rho, 1-e_lo, 1+e_hi) A), group-std advantages,
           sequence-mean aggregation (Shao et al. 2024, DeepSeekMath)
    dapo   the clipped ratio with clip-higher (e_hi = 0.28), token-level aggregation (Yu et al. 2025)
With beta > 0, the lecture's KL-regularised objective E[r] - beta KL[pi || pi_ref] to a frozen reference, whose
optimum is pi_ref(y|x) exp(r(x, y) / beta) / Z(x). With d_t = log pi(y_t) / pi_ref(y_t) (`kl_in`, `kl_estimator`):
    reward  r_i <- r_i - beta sum_t d_t with the sampler's log-probs (k1 in the reward, PPO-RLHF): the policy
            gradient of E[r] - beta KL[pi || pi_ref]; the advantages' normalisation leaves its optimum unchanged
    loss    + beta sg(min(rho_t, eps)) k(d_t) per token (importance-weighted: samples come from pi_gen), with
            k2 = d^2 / 2, whose gradient E[d grad log pi] is KL[pi || pi_ref]'s (reverse), or
            k3 = exp(-d) + d - 1 (DeepSeekMath; TRL's GRPO with use_bias_correction_kl=False, where TRL 1.16's
            default True multiplies it by pi / pi_old with gradient: the reverse KL's): an estimate of KL[pi || pi_ref]
            whose gradient E[(1 - pi_ref / pi) grad log pi] is that of KL[pi_ref || pi] (forward): it converges
            elsewhere.
            Here the advantage's scale weighs the reward against beta: the normalised reward's optimum.
Logits and log-softmax are float32 at the LM head, even under bf16 mixed precision.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable

import torch
from transformers import PreTrainedModel

from genlight.callbacks.wandb_axes import STEP
from genlight.envs.episodes import Episodes
from genlight.envs.tools import EnvSpec
from genlight.lightning_modules.sampling import SamplingModule
from genlight.models.logps import completion_logps
from genlight.models.rollout import Rollout, RolloutEngine
from genlight.rl.advantages import kl_penalised_rewards
from genlight.rl.loss import (
    LossOptions,
    count_units,
    is_weights,
    kl_place,
    loss_groups,
    ratio_stats,
    rlvr_loss,
    token_weights,
)
from genlight.rl.recipe import Recipe, check_retirement
from genlight.rl.rollouts import (
    across_processes,
    batch_advantages,
    encoded_tokens,
    gather,
    micro_batch,
    plan,
    sample,
    sampled_logps,
    shares_prompt_cache,
)


class RLVRModule(SamplingModule):
    DASHBOARD = [  # the W&B workspace's sections (sweeps/dashboard.py)
        ("Reward", [
            ("line", "mean reward against steps", STEP, ["train/reward/mean", "train/pass_rate"]),
            ("line", "mean reward against samples", "train/samples", ["train/reward/mean"]),
            ("line", "held-out pass@1 against samples", "val/samples", ["val/pass@1", "val/majority@k"]),
            ("line", "held-out pass@1 against compute (FLOPs)", "val/compute_flops", ["val/pass@1"]),
            ("line", "held-out pass@k", STEP, ["val/pass@1", "val/pass@k", "val/majority@k"]),
        ]),
        ("ScaleRL recipe", [
            ("line", "zero-variance groups, retired prompts", STEP, ["train/frac_zero_variance", "train/retired_prompts"]),
            ("line", "importance weight rho = pi_train / pi_gen", STEP,
             ["train/rho/mean", "train/rho/max", "train/rho/frac_truncated"]),
            ("line", "train/inference drift |log pi_train - log pi_gen|", STEP, ["train/logp_diff/mean", "train/logp_diff/max"]),
            ("line", "entropy, completion length", STEP, ["train/entropy", "train/completion_length", "train/truncation_rate"]),
        ]),
        ("KL to the reference (beta > 0; RLHF: reward=model)", [
            ("line", "KL[pi || pi_ref] per token (k3 estimate)", STEP, ["train/kl"]),
            ("line", "reward (the model's, RLHF) against verified pass rate: hacking if they part", STEP,
             ["train/reward/mean", "train/pass_rate"]),
        ]),
        ("Samples", [("table", "train/completions"), ("table", "val/samples")]),
        ("Throughput", [("line", "tokens/s", STEP, ["perf/gen_tokens_per_s", "perf/train_forward_tokens_per_s"])]),
    ]

    DATA_KIND = "prompt"

    def __init__(
        self,
        net: PreTrainedModel | str | Callable[..., PreTrainedModel],
        tokenizer=None,
        *,
        reward: Callable | None = None,
        rollout: Callable[..., RolloutEngine] | None = None,
        env: EnvSpec | None = None,
        recipe: Recipe | None = None,
        lr: float = 1e-4,
        weight_decay: float = 0.0,
        betas: tuple[float, float] = (0.9, 0.99),
        warmup_steps: int = 20,
        min_lr_ratio: float = 1.0,
        num_logged_samples: int = 4,
        lora: dict | None = None,
        gradient_checkpointing: bool = False,
        **options,
    ):
        """RL with verifiable rewards on prompt rows (`DATA_KIND` prompt: each with its reference answer), the ScaleRL
        recipe by default.

        Args:
            reward: the verifier, called as reward(completion, answer) -> float (`genlight.ExactAnswer`,
                `NumericAnswer`, `MathVerify`, any function through `FunctionReward`), or a `RewardModel`
                (RLHF). None: `ExactAnswer()`.
            rollout: the sampling engine's factory (`HFRollout`, the default; `VLLMRollout`).
            env: multi-turn episodes with tools (`genlight.envs.tools.EnvSpec`); None: one completion per prompt.
            recipe, **options: the recipe (`genlight.rl.recipe.Recipe`: sampling, loss, advantage, KL, filters,
                micro-batches), as an object and/or as its fields by keyword (`loss_type="grpo"`, over `recipe`'s):
                the YAML's flat `algo.*` keys. Checked here, each error naming its key; `self.recipe` is
                `Recipe.resolved()`, the values the run uses.
            The rest: `LMModule`'s (the optimizer's, LoRA, gradient checkpointing)."""
        given, unknown = Recipe.pick({**(dataclasses.asdict(recipe) if recipe else {}), **options})
        if unknown:
            raise TypeError(f"RLVRModule got unknown options {sorted(unknown)} (algo.*): neither the recipe's "
                            f"(genlight.rl.recipe.Recipe) nor LMModule's")
        recipe = given.resolved()  # the nulls that choose a default filled in
        super().__init__(net, tokenizer, reward=reward, rollout=rollout, env=env, val_num_samples=recipe.val_num_samples,
                         lagged_sampler=recipe.generation_lag > 0, lr=lr, weight_decay=weight_decay, betas=betas,
                         warmup_steps=warmup_steps, min_lr_ratio=min_lr_ratio, max_new_tokens=recipe.max_new_tokens,
                         num_logged_samples=num_logged_samples, lora=lora, gradient_checkpointing=gradient_checkpointing)
        self.recipe = recipe
        # the hyper-parameters are flat (the checkpoint rebuilds the module from them) and hold the values this run uses
        self.hparams.pop("recipe", None)
        self.hparams.update(dataclasses.asdict(recipe))
        self.check_micro_batches(recipe.micro_batch_size, recipe.max_tokens_per_micro_batch)
        check_retirement(self.verifier is not self.reward, recipe.retire_threshold)
        if recipe.beta > 0:  # the KL penalty's pi_ref: model.ref_pretrained, or pi_0
            self.init_reference(recipe.ref_pretrained)
        # pi_gen (`self.generator`, with generation_lag > 0) is refreshed every `generation_lag` optimizer steps
        self._synced_at = -1  # the optimizer step of pi_gen's last refresh
        self.retired: set[int] = set()  # ScaleRL's no-positive resampling: train prompts with pass rate >= threshold

    @staticmethod
    def check_config(cfg) -> None:
        """Before any work (train.py calls it first, before the warm start): `SamplingModule`'s checks, the recipe's
        (built from the config's `algo.*` keys) and whether retirement fits the reward."""
        from hydra.utils import get_class
        from omegaconf import OmegaConf

        SamplingModule.check_config(cfg)
        Recipe.pick(OmegaConf.to_container(cfg.algo, resolve=True))
        reward = OmegaConf.select(cfg, "algo.reward._target_")
        check_retirement(bool(reward) and hasattr(get_class(reward), "score_batch"), cfg.algo.get("retire_threshold"))

    # ------------------------------------------------------------------ state
    def setup(self, stage: str) -> None:
        super().setup(stage)  # the data's kind; manual optimization
        dm = getattr(self.trainer, "datamodule", None)
        if dm is not None and hasattr(dm, "retired"):
            dm.retired.update(self.retired)
            self.retired = dm.retired  # one set: the train sampler skips what the module retires

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        super().on_save_checkpoint(checkpoint)
        checkpoint["rlvr"] = {"retired": sorted(self.retired)}

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        super().on_load_checkpoint(checkpoint)
        self.retired.clear()  # in place: the datamodule's sampler holds this set
        self.retired.update(checkpoint.get("rlvr", {}).get("retired", []))

    # ------------------------------------------------------------------ training: the ScaleRL pipeline
    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        hp = self.recipe
        t0 = time.perf_counter()
        if self.generator is None:  # on-policy: the engine samples from the policy as the last step left it
            self.engine.load_weights(self.model.state_dict())
        roll, texts = sample(self.engine, self.tokenizer, self.model, batch, hp.num_generations,
                             max_new_tokens=hp.max_new_tokens, temperature=hp.temperature, top_p=hp.top_p,
                             generator=self.noise("train", self.global_step), env=self.env)  # G from pi_gen
        t_gen = time.perf_counter() - t0
        r, passed, errors = self.score(batch, texts, roll)  # rewards and passes, (B, G)
        ranges = plan(self, batch["prompt_attention_mask"], roll.lengths, r.size(1), hp.micro_batch_size,
                      hp.max_tokens_per_micro_batch)
        ref_logp = self.reference_logps(batch, roll, ranges) if self.has_reference else None
        old_logp = self.generator_logps(batch, roll, ranges) if hp.recompute_gen_logps else None
        r_train = r
        if kl_place(hp.beta, hp.kl_in) == "reward":  # r - beta KL sample, PPO-RLHF
            r_train = kl_penalised_rewards(r, roll.logps.view(*r.shape, -1), ref_logp.view(*r.shape, -1),
                                           roll.loss_mask.view(*r.shape, -1), hp.beta)
        lengths = roll.loss_mask.sum(-1).view(r.shape)  # the policy's tokens of each sample (REINFORCE++'s weights)
        adv, keep, zv_all = self.advantages(r_train, r, lengths)  # `algo.advantage`'s; the zero-variance filter
        self.retire(batch, passed)  # no-positive resampling
        loss, stats, entropy, t_train = self.policy_update(batch, roll, adv, keep, ranges=ranges,
                                                               ref_logp=ref_logp, old_logp=old_logp)
        trained = encoded_tokens(batch["prompt_attention_mask"], roll.lengths, r.size(1), ranges,
                                 shares_prompt_cache(self.model))
        self.log_step(batch, roll, texts, (r, passed, zv_all, errors), (loss, stats, entropy, trained), (t_gen, t_train))
        return loss

    @torch.no_grad()
    def reference_logps(self, batch: dict, roll: Rollout, ranges: list[tuple[int, int]]) -> torch.Tensor:
        """log pi_ref of every sampled token (N, T), in the step's micro-batches, without gradients."""
        with self.reference() as ref_model:
            return sampled_logps(ref_model, batch, roll, ranges, self.recipe.temperature)

    @torch.no_grad()
    def generator_logps(self, batch: dict, roll: Rollout, ranges: list[tuple[int, int]]) -> torch.Tensor:
        """log pi_old of every sampled token (N, T): the weights that sampled (the lagged pi_gen, or the policy before
        this step's update) run by the trainer's kernels (`algo.recompute_gen_logps`, verl's decoupled mode), so that
        the engine's mismatch (pi_old / pi_rollout, corrected by `algo.is_correction`) and the lag (pi_train /
        pi_old, the loss's ratio) come apart. One forward pass over the step's samples, without gradients."""
        model = self.generator if self.generator is not None else self.model
        return sampled_logps(model, batch, roll, ranges, self.recipe.temperature)

    def advantages(self, r: torch.Tensor, raw: torch.Tensor | None = None, lengths: torch.Tensor | None = None
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """This process's (B, G) advantages of rewards `r`, its kept groups and the batch's tied groups
        (`batch_advantages`, `algo.advantage`'s estimator over every process). Ties are judged on `raw` (the rewards
        before a KL penalty); with `kl_in=reward` and beta > 0 no group leaves the loss (a tied group's advantage is
        its KL part alone)."""
        hp = self.recipe
        filtered = hp.zero_variance_filter and kl_place(hp.beta, hp.kl_in) != "reward"
        self.last_batch = batch_advantages(self, hp.advantage, r, raw, lengths, filtered=filtered)  # for inspection
        return self.last_batch["adv"], self.last_batch["keep"], self.last_batch["zero_variance_all"]

    def retire(self, batch: dict, passed: torch.Tensor) -> None:
        """Retire prompts whose pass rate reaches `retire_threshold` (on every process)."""
        hp = self.recipe
        if hp.retire_threshold is not None:
            idx_all, rate_all = gather(self, batch["index"]), gather(self, passed.float().mean(-1))
            self.retired.update(idx_all[rate_all >= hp.retire_threshold].tolist())

    def policy_update(self, batch: dict, roll: Rollout, adv: torch.Tensor, keep: torch.Tensor, *,
                      ranges: list[tuple[int, int]] | None = None, ref_logp: torch.Tensor | None = None,
                      old_logp: torch.Tensor | None = None):
        """-J over micro-batches of the step's samples, then one optimizer step. Each micro-batch computes log
        pi_train of its sampled tokens (with gradient; each prompt encoded once for its samples there) and its share
        of `rlvr_loss` (the KL term reads `ref_logp`, `reference_logps` of the step): the tokens' weights and the loss's denominator are counted over
        the whole step (all processes) first, so the accumulated gradient is the whole step's. With `old_logp`
        (`generator_logps`) the loss's ratio is pi_train / pi_old, and `algo.is_correction` weighs each token by
        pi_old / pi_rollout (`is_weights`). Returns the step's loss, statistics, entropy (N, T) and forward time."""
        hp = self.recipe
        b, g = adv.shape
        opt = self.optimizers()
        opt.zero_grad(set_to_none=True)
        mask = roll.loss_mask.view(b, g, -1)  # the policy's tokens (a tool turn's are not the policy's)
        groups = loss_groups(keep, hp.beta, hp.kl_in, hp.entropy_coef)  # filtered groups keep a KL / entropy term
        weights = token_weights(mask, groups, hp.loss_agg, self.generation_budget).flatten(0, 1)
        units = count_units(mask, groups, hp.loss_agg)
        normalizer = gather(self, units.view(1)).sum().float() / self.trainer.world_size
        adv_flat = adv.flatten()
        gen_logp, corr, corr_stats = roll.logps, None, {}
        if old_logp is not None:  # decoupled: the ratio against pi_old; the engine's mismatch weighed apart
            gen_logp = old_logp
            corr, corr_stats = is_weights(old_logp, roll.logps, roll.loss_mask, hp.is_correction, hp.is_level,
                                          hp.is_cap_low, hp.is_cap_high)
        logp = torch.zeros_like(roll.logps)
        entropy = torch.zeros_like(roll.logps)
        ranges = ranges or plan(self, batch["prompt_attention_mask"], roll.lengths, g, hp.micro_batch_size,
                                hp.max_tokens_per_micro_batch)
        if ref_logp is None and self.has_reference:
            ref_logp = self.reference_logps(batch, roll, ranges)
        loss, t_train = torch.zeros((), device=self.device), 0.0
        for s, e in ranges:
            t1 = time.perf_counter()
            seqs = micro_batch(batch, roll, g, s, e, hp.temperature)
            t = seqs[2].size(1)
            lp, ent = completion_logps(self.model, *seqs)
            part, _ = rlvr_loss(
                lp, gen_logp[s:e, :t], adv_flat[s:e], roll.loss_mask[s:e, :t], loss_type=hp.loss_type,
                epsilon=hp.epsilon, clip_low=hp.clip_low, clip_high=hp.clip_high, beta=hp.beta,
                ref_logp=None if ref_logp is None else ref_logp[s:e, :t], kl_estimator=hp.kl_estimator,
                kl_in=hp.kl_in, entropy=ent, entropy_coef=hp.entropy_coef, normalizer=normalizer,
                weights=weights[s:e, :t], is_weight=None if corr is None else corr[s:e, :t], with_stats=False)
            t_train += time.perf_counter() - t1
            self.manual_backward(part)
            loss += part.detach()
            logp[s:e, :t], entropy[s:e, :t] = lp.detach(), ent.detach()
        opt.step()  # clips in `on_before_optimizer_step`, after the precision plugin unscaled the gradients
        self.lr_schedulers().step()
        stats = ratio_stats(logp, gen_logp, adv_flat, roll.loss_mask, hp.loss_type,
                            LossOptions(hp.epsilon, hp.clip_low, hp.clip_high), ref_logp, hp.beta)
        return loss, {**stats, **corr_stats}, entropy, t_train  # t_train: the forward passes only

    def log_step(self, batch: dict, roll: Rollout, texts: list[str], scores: tuple, update: tuple,
                 times: tuple[float, float]) -> None:
        """The step's metrics: `scores` (rewards, passes, the batch's zero-variance groups, verifier errors), `update`
        (loss, ratio statistics, entropy, the tokens the policy update encoded) and `times` (sampling, training)."""
        r, passed, zv_all, errors = scores
        loss, stats, entropy, trained = update
        t_gen, t_train = times
        b, g = r.shape
        n_gen = int(roll.lengths.sum())
        n_prompt = int(batch["prompt_attention_mask"].sum())
        n_train = n_prompt + n_gen  # each prompt is encoded once for its G samples (a whole group's micro-batch)
        # the step's compute is every process's tokens (their completion lengths differ): summed, so every process
        # holds the same count (the ScaleRL curve's x-axis). The sampler prefills each prompt once for its samples;
        # the update (and pi_old's recomputation) encodes what its micro-batches hold (`encoded_tokens`)
        counts = gather(self, torch.tensor([[n_prompt + n_gen, trained, b * g]], device=self.device)).sum(0).tolist()
        sampled, trained = counts[0], counts[1]
        self.compute += float(2 * self.n_params * sampled + 6 * self.n_params * trained
                              + (2 * self.n_params * trained if self.recipe.recompute_gen_logps else 0))  # pi_old's
        self.samples += counts[2]
        m = roll.loss_mask
        log = {"loss": loss.detach(), "reward/mean": r.mean(), "reward/std": r.std(), "pass_rate": passed.float().mean(),
               "entropy": entropy[m].mean(), "completion_length": m.sum(-1).float().mean(),  # the policy's tokens
               "truncation_rate": roll.truncated.float().mean(), "reward_errors": float(errors), **stats}
        if isinstance(roll, Episodes):  # multi-turn: turns, tool calls and errors per episode
            log.update({"turns/mean": roll.turns.float().mean(), "turns/max": roll.turns.max().float(),
                        "tool_calls": roll.tool_calls.float().mean(), "tool_errors": roll.tool_errors.float().mean()})
        log = across_processes(self, log, r, m, self.recipe.is_level)
        log.update({"frac_zero_variance": zv_all.float().mean(), "retired_prompts": float(len(self.retired)),
                    "samples": float(self.samples), "compute_flops": self.compute})  # the same on every process
        if isinstance(roll, Episodes):  # the environment's own measurements, pooled over every process's episodes
            log.update({f"env/{k}": v for k, v in self.pooled(roll.env_metrics).items()})
        for k, v in log.items():
            self.log(f"train/{k}", v, prog_bar=k in ("reward/mean", "pass_rate"), batch_size=b)
        self.log("perf/gen_tokens_per_s", n_gen / max(t_gen, 1e-9), batch_size=b)
        self.log("perf/train_forward_tokens_per_s", n_train / max(t_train, 1e-9), batch_size=b)
        every = self.recipe.log_completions_every_n_steps
        if every and self.global_step % every == 0:
            self.log_completions(batch, roll, texts, r)

    def on_train_batch_end(self, outputs, batch, batch_idx) -> None:
        """Refresh pi_gen from the trainer's weights every `generation_lag` optimizer steps."""
        lag = self.recipe.generation_lag
        if lag > 0 and self.global_step % lag == 0 and self.global_step != self._synced_at:
            if self.sharded:  # FSDP2: the policy's own shards (the engine's copy is sharded the same way)
                from genlight.models.lm import reshard

                reshard(self.model)
            self.engine.load_weights(self.model.state_dict())
            self._synced_at = self.global_step
