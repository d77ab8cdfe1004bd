"""What the algorithms that sample from their policy share (RLVR; on-policy distillation): the sampling engines, the
verifier that scores what they sample, held-out pass@k from sampled completions, the compute counters, and one
optimizer step per batch of prompts over micro-batches of its samples. No algorithm here (no advantage, no loss): each
lives in its own file beside this one, on the rollouts layer (src/rl/rollouts.py)."""

from __future__ import annotations

import copy
from collections.abc import Callable

import torch
from torchmetrics import MeanMetric

from genlight.envs.episodes import Episodes
from genlight.envs.tools import EnvSpec, check_tool_template
from genlight.lightning_modules.lm import LMModule
from genlight.metrics import PassAtK
from genlight.models.rollout import HFRollout, Rollout, RolloutEngine
from genlight.rewards import ExactAnswer
from genlight.rl.rollouts import check_micro_batches, gather, sample, sampling_generator, score_samples


class SamplingModule(LMModule):
    """An `LMModule` on prompt rows that samples from its policy (not trained itself; `RLVRModule` and
    `DistillModule` extend it). Besides `LMModule`'s keyword arguments its constructor takes the verifier (`reward`),
    the engine's factory (`rollout`), the environment (`env`) and `lagged_sampler`: whether the training engine samples
    from a frozen copy of the policy (`self.generator`, refreshed by the subclass: RLVR's pi_gen) or from the policy. Its hparams must hold val_num_samples, val_temperature, truncated_reward, pass_threshold,
    reward_on_error and seed (`score_samples`, `_eval_step`)."""

    DATA_KIND = "prompt"

    def __init__(self, net, tokenizer=None, *, reward: Callable | None, rollout: Callable[..., RolloutEngine] | None,
                 env: EnvSpec | None, val_num_samples: int, lagged_sampler: bool = False, **lm_kwargs):
        super().__init__(net, tokenizer, **lm_kwargs)
        self.hparams.pop("lagged_sampler", None)  # the subclass's choice, not an option (RLVR: generation_lag > 0)
        reward = ExactAnswer() if reward is None else reward
        if not callable(reward):
            raise ValueError(f"algo.reward={reward!r}: a verifier is required, called as reward(completion, answer) "
                             "(reward=exact|numeric|math|custom, or a reward model: reward=model)")
        # multi-turn (env=, src/envs/): episodes of tool calls; the chat template must show tools and their results
        self.env = env
        if env is not None:
            check_tool_template(self.tokenizer)
        self.reward = reward  # a reward model (an nn.Module) becomes a frozen submodule: device, FSDP2, checkpoints
        self.verifier = getattr(reward, "verifier", reward)  # what "passes" (pass@k, pass rate): never the model
        make_engine = rollout or HFRollout
        tok = self.tokenizer
        # the engine that samples for training holds the lagged copy (its weights are in the checkpoint) or the
        # policy itself; the evaluation's always holds the policy
        self.generator = copy.deepcopy(self.model).requires_grad_(False).eval() if lagged_sampler else None
        self.engine: RolloutEngine = make_engine(self.generator or self.model, tok.eos_token_id, tok.pad_token_id)
        self.eval_engine: RolloutEngine = (
            make_engine(self.model, tok.eos_token_id, tok.pad_token_id) if self.generator is not None else self.engine)
        # cumulative model FLOPs (2 N per token a model runs forward, 6 N per trained token) and sampled completions:
        # checkpointed; the x-axes of pass@1 against compute and samples
        self.compute = 0.0
        self.samples = 0
        self.n_params = sum(p.numel() for p in self.model.parameters())
        # evaluation: pass@k for k = 1, 2, 4, ... up to the samples per prompt, majority vote, mean reward
        ks = [k for k in (1, 2, 4, 8, 16, 32, 64) if k <= val_num_samples] + [val_num_samples]
        self.val_pass, self.test_pass = PassAtK(ks), PassAtK(ks)
        self.val_reward, self.test_reward = MeanMetric(), MeanMetric()
        self.last_val: dict[str, float] = {}
        self._env_sums: dict[str, list[float]] = {}  # an evaluation's environment measurements (`pooled`)

    def check_micro_batches(self, micro_batch_size: int | None, max_tokens_per_micro_batch: int | None) -> None:
        """A micro-batch holds at least one sample, and its token bound one sample at its longest."""
        check_micro_batches(micro_batch_size, max_tokens_per_micro_batch, self.generation_budget,
                            "env.max_tokens" if self.env is not None else "algo.max_new_tokens")

    @property
    def generation_budget(self) -> int:
        """A sample's most completion tokens: env.max_tokens for an episode, algo.max_new_tokens for one completion
        (`loss_agg=constant` divides by it, as TRL's dr_grpo by max_completion_length)."""
        return self.env.max_tokens if self.env is not None else self.hparams.max_new_tokens

    @staticmethod
    def check_config(cfg) -> None:
        """Before any work (train.py calls it first, before the warm start): the rollout engine is installed, a
        reward model exists, the environment imports and the tokenizer's template shows its tools."""
        from hydra.utils import get_class
        from omegaconf import OmegaConf

        for key in ("algo.rollout._target_", "algo.reward._target_"):
            target = OmegaConf.select(cfg, key)
            if target and hasattr(cls := get_class(target), "check_config"):
                cls.check_config(OmegaConf.select(cfg, key.rsplit(".", 1)[0]))
        if cfg.algo.get("env") is not None:  # multi-turn: the environment imports, its tools have schemas, the
            from hydra.errors import InstantiationException  # template shows them (before the warm start)
            from hydra.utils import instantiate

            from genlight.envs.tools import import_target

            if target := OmegaConf.select(cfg, "algo.env.environment._target_"):
                import_target(target, "env.environment")
            try:
                instantiate(cfg.algo.env)
            except InstantiationException as e:  # the env's own message, not Hydra's wrapper around it
                raise (e.__cause__ if isinstance(e.__cause__, ValueError) else e) from None
            check_tool_template(instantiate(cfg.model.tokenizer), "model.tokenizer")

    def setup(self, stage: str) -> None:
        super().setup(stage)  # the data's kind
        if stage == "fit":
            # One optimizer step per batch of prompts, over micro-batches of its samples: the module steps the
            # optimizer itself, with the trainer's clipping settings (set here, after Lightning's check that refuses
            # `gradient_clip_val` with manual optimization: this module applies it, `on_before_optimizer_step`)
            if self.trainer.accumulate_grad_batches != 1:
                raise ValueError(
                    f"trainer.accumulate_grad_batches={self.trainer.accumulate_grad_batches}: {type(self).__name__} "
                    "takes one optimizer step per batch of prompts; bound its memory with algo.micro_batch_size / "
                    "algo.max_tokens_per_micro_batch (gradients accumulate over them within the step)")
            self.automatic_optimization = False
        dm = getattr(self.trainer, "datamodule", None)
        if hasattr(self.verifier, "check_references"):  # before any work: a reference it cannot use, or a reward hole
            for split, examples in getattr(dm, "examples", {}).items():
                self.verifier.check_references(examples, split)

    def on_before_optimizer_step(self, optimizer) -> None:
        """The trainer's gradient_clip_val / gradient_clip_algorithm, as Lightning applies them in automatic
        optimization: here the precision plugin has unscaled the gradients (16-mixed's GradScaler multiplies the loss
        by up to 2^16; clipping before the unscale would clip the scaled norm and shrink the step by that factor)."""
        if not self.automatic_optimization:
            self.clip_gradients(optimizer)

    def frozen_models(self) -> list[torch.nn.Module]:
        reward_model = [self.reward.model] if isinstance(self.reward, torch.nn.Module) else []
        return super().frozen_models() + ([self.generator] if self.generator is not None else []) + reward_model

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint["sampling"] = {"compute": self.compute, "samples": self.samples}

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        state = checkpoint.get("sampling", checkpoint.get("rlvr", {}))  # "rlvr": checkpoints before this class
        self.compute, self.samples = state.get("compute", 0.0), state.get("samples", 0)

    def noise(self, stage: str, step: int) -> torch.Generator:
        """Sampling noise as a function of (seed, stage, step, rank): a resumed run draws the same."""
        return sampling_generator(self.hparams.seed, stage, step, self.global_rank, self.device)

    def score(self, batch: dict, texts: list[str], roll: Rollout) -> tuple[torch.Tensor, torch.Tensor, int]:
        """(B, n) rewards and passes of the n samples of each prompt (`score_samples`), and the verifier's errors:
        one definition for train/pass_rate, val/pass@k and eval.py's."""
        r, passed, errors = score_samples(self, batch["prompts"], batch["references"], texts, roll.truncated,
                                          getattr(roll, "env_rewards", None))
        shape = (len(batch["prompts"]), -1)
        return r.view(shape), passed.view(shape), errors

    def pooled(self, sums: dict[str, tuple[float, float]]) -> dict[str, float]:
        """(numerator, denominator) pairs, summed over processes: sum / sum (nan where nothing was counted)."""
        if not sums:
            return {}
        keys = sorted(sums)
        total = gather(self, torch.tensor([[sums[k][0] for k in keys] + [sums[k][1] for k in keys]],
                                          dtype=torch.float64, device=self.device)).sum(0)
        return {k: float(total[i] / total[len(keys) + i]) if total[len(keys) + i] > 0 else float("nan")
                for i, k in enumerate(keys)}

    def log_completions(self, batch: dict, roll: Rollout, texts: list[str], r: torch.Tensor) -> None:
        """A table of the step's samples (`train/completions`): the first prompts' (`num_logged_samples`) every
        sample (an episode: its transcript, tool turns too), with its reward (B, G) and whether it was cut."""
        g = r.size(1)
        shown = roll.transcripts() if isinstance(roll, Episodes) else texts
        rows = [[self.global_step, batch["prompts"][i], shown[i * g + j], batch["references"][i], float(r[i, j]),
                 bool(roll.truncated[i * g + j])]
                for i in range(min(self.hparams.num_logged_samples, len(batch["prompts"]))) for j in range(g)]
        self.log_table("train/completions", ["step", "prompt", "completion", "answer", "reward", "truncated"], rows)

    # ------------------------------------------------------------------ evaluation
    def _eval_step(self, batch: dict, batch_idx: int, stage: str) -> None:
        """n samples per prompt from the current policy: pass@k, majority@n, mean reward."""
        hp = self.hparams
        n = hp.val_num_samples
        roll, texts = sample(self.eval_engine, self.tokenizer, self.model, batch, n, max_new_tokens=hp.max_new_tokens,
                             temperature=hp.val_temperature, top_p=1.0, generator=self.noise(stage, batch_idx),
                             env=self.env)
        r, passed, _ = self.score(batch, texts, roll)
        r = r.flatten()
        b = len(batch["prompts"])
        correct = passed.view(b, n).tolist()
        answers = [self.verifier.extract(t) if hasattr(self.verifier, "extract") else t.strip() for t in texts]
        getattr(self, f"{stage}_pass").update(correct, [answers[i * n : (i + 1) * n] for i in range(b)])
        getattr(self, f"{stage}_reward").update(r)
        for k, (num, den) in getattr(roll, "env_metrics", {}).items():  # summed over the split's batches
            acc = self._env_sums.setdefault(k, [0.0, 0.0])
            acc[0], acc[1] = acc[0] + num, acc[1] + den
        if batch_idx == 0:
            shown = roll.transcripts() if isinstance(roll, Episodes) else texts  # an episode: its tool turns too
            self._samples = [
                [batch["prompts"][i // n], shown[i], batch["references"][i // n], float(r[i])]
                for i in range(min(len(texts), hp.num_logged_samples * n))
            ]

    def _eval_epoch_end(self, stage: str) -> None:
        metric = getattr(self, f"{stage}_pass")
        values = {f"{stage}/{k}": v for k, v in metric.compute().items()}
        k_max = max(metric.ks)
        values[f"{stage}/pass@k"] = values[f"{stage}/pass@{k_max}"]
        values[f"{stage}/majority@k"] = values.pop(f"{stage}/majority")
        values[f"{stage}/reward/mean"] = getattr(self, f"{stage}_reward").compute()
        if self.env is not None:  # every process has its sums (the same keys: the same environment)
            values |= {f"{stage}/env/{k}": v for k, v in self.pooled(dict(self._env_sums)).items()}
            self._env_sums = {}
        metric.reset()
        getattr(self, f"{stage}_reward").reset()
        if stage == "val":
            self.last_val = {k: float(v) for k, v in values.items()}
            # the counters beside the val metrics: W&B plots pass@1 against samples and compute as well
            values["val/samples"] = float(self.samples)
            values["val/compute_flops"] = float(self.compute)
        if not self.trainer.sanity_checking:
            for k, v in values.items():
                self.log(k, v, prog_bar=k.endswith("pass@1"), sync_dist=False)
        self.log_samples(stage, columns=("prompt", "completion", "answer", "reward"))

    def on_validation_epoch_start(self) -> None:
        self.eval_engine.load_weights(self.model.state_dict())  # the policy as training left it

    def on_test_epoch_start(self) -> None:
        self.eval_engine.load_weights(self.model.state_dict())

    def on_validation_epoch_end(self) -> None:
        self._eval_epoch_end("val")

    def on_test_epoch_end(self) -> None:
        self._eval_epoch_end("test")
