"""On-policy distillation: the student samples, a frozen teacher scores every token of what it sampled, and the student
moves toward the teacher's next-token distribution at each of those positions (GKD: Agarwal et al. 2024, "On-Policy
Distillation of Language Models"; TRL's `DistillationTrainer`; Thinking Machines' "On-Policy Distillation", 2025):

    L(theta) = 1 / sum_i |y_i| * sum_i sum_t D_beta( p_T(. | x_i, y_i,<t) || p_S,theta(. | x_i, y_i,<t) )

    y_i ~ p_S (the student itself) with probability lmbda, else the dataset's completion of x_i (GKD's mix; a coin per
    step, deterministic in (seed, step)); D_beta the generalized Jensen-Shannon divergence at temperature tau
    (src/models/divergence.py): beta 0 forward KL(p_T || p_S), 0.5 JSD, 1 reverse KL(p_S || p_T); summed over the
    completion tokens the student produced (an episode's tool turns are masked) and divided by their count over the
    whole step, all processes (TRL's normaliser). The samples are not differentiated through: the gradient is the
    divergence's at fixed y, as in GKD and TRL.

The teacher is any causal LM sharing the student's tokenizer (`teacher.pretrained=DIR`, e.g. the policy
`python train.py algo=rlvr` exports to its run's `hf/`); it never trains, and its weights are not written into the
checkpoints (it is loaded again from its directory on resume). Both models' LM heads run in float32 and in chunks of
positions, so the teacher's logits over a 151,936-row vocabulary are never held for the whole batch.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable
from pathlib import Path

import torch
from transformers import PreTrainedModel

from genlight.callbacks.wandb_axes import STEP
from genlight.datamodules.lm import completion_ids, pad
from genlight.envs.tools import EnvSpec
from genlight.lightning_modules.sampling import SamplingModule
from genlight.models.divergence import check_beta, check_plain_logits, head_divergence
from genlight.models.lm import language_model
from genlight.models.logps import completion_hidden
from genlight.models.rollout import Rollout, RolloutEngine
from genlight.models.tokenizer import load_tokenizer
from genlight.rl.rollouts import (
    check_micro_batches,
    encoded_tokens,
    gather,
    micro_batch,
    plan,
    sample,
    shares_prompt_cache,
)


def check_teacher(teacher: PreTrainedModel, student: PreTrainedModel, tokenizer, path: str | None) -> None:
    """The teacher scores the student's tokens: the same vocabulary, row for row (the LM heads' sizes), and, where
    its directory holds a tokenizer, the same tokenizer (the same ids for the same strings)."""
    rows_t, rows_s = teacher.get_output_embeddings().weight.size(0), student.get_output_embeddings().weight.size(0)
    where = f"teacher.pretrained={path}" if path else "teacher"
    if rows_t != rows_s:
        raise ValueError(f"{where}: the teacher's LM head has {rows_t} rows and the student's {rows_s}: distillation "
                         "compares their next-token distributions, so they must share the tokenizer and vocabulary")
    if path and any((Path(path) / f).exists() for f in ("tokenizer.json", "tokenizer_config.json", "vocab.json")):
        vocab_t, vocab_s = load_tokenizer(path).get_vocab(), tokenizer.get_vocab()
        if vocab_t != vocab_s:
            diff = sorted(set(vocab_t.items()) ^ set(vocab_s.items()), key=str)[:3]
            raise ValueError(f"{where}: the teacher's tokenizer differs from the student's ({len(vocab_t)} and "
                             f"{len(vocab_s)} tokens; e.g. {diff}): the teacher would score other tokens than the "
                             "student sampled")
    check_plain_logits(teacher, "teacher.pretrained")


def check_options(*, lmbda: float, beta: float, temperature: float, num_generations: int,
                  micro_batch_size: int | None, multi_turn: bool) -> None:
    """The options' ranges (from the constructor, and from the config before the warm start)."""
    check_beta(beta)
    if not 0.0 <= lmbda <= 1.0:
        raise ValueError(f"algo.lmbda={lmbda}: the fraction of on-policy steps must be in [0, 1]")
    if temperature <= 0:
        raise ValueError(f"algo.temperature={temperature}: must be > 0")
    if num_generations < 1:
        raise ValueError(f"algo.num_generations={num_generations}: must be >= 1")
    check_micro_batches(micro_batch_size)
    if multi_turn and lmbda < 1:
        raise ValueError(f"algo.lmbda={lmbda} with env: a multi-turn episode has no dataset completion to train on "
                         "off-policy; set algo.lmbda=1.0")


class DistillModule(SamplingModule):
    DASHBOARD = [  # the W&B workspace's sections (sweeps/dashboard.py)
        ("Distillation", [
            ("line", "divergence to the teacher per token", STEP, ["train/loss"]),
            ("line", "held-out pass@1 against compute (FLOPs, the teacher's included)", "val/compute_flops",
             ["val/pass@1"]),
            ("line", "held-out pass@k", STEP, ["val/pass@1", "val/pass@k", "val/majority@k"]),
            ("line", "student entropy, on-policy steps", STEP, ["train/entropy", "train/on_policy"]),
            ("line", "completion length", STEP, ["train/completions/mean_length", "train/completions/clipped_ratio"]),
        ]),
        ("Samples", [("table", "val/samples")]),
    ]

    def __init__(
        self,
        net: PreTrainedModel | str | Callable[..., PreTrainedModel],
        tokenizer=None,
        *,
        teacher: PreTrainedModel | str | Callable[..., PreTrainedModel],
        reward: Callable | None = None,
        rollout: Callable[..., RolloutEngine] | None = None,
        env: EnvSpec | None = None,
        lmbda: float = 1.0,
        beta: float = 1.0,
        temperature: float = 1.0,
        num_generations: int = 1,
        max_new_tokens: int = 8,
        micro_batch_size: int | None = None,
        max_tokens_per_micro_batch: int | None = None,
        val_num_samples: int = 8,
        val_temperature: float = 1.0,
        pass_threshold: float = 1.0,
        truncated_reward: float | str | None = 0.0,
        reward_on_error: str = "raise",
        seed: int = 42,
        lr: float = 1e-4,
        weight_decay: float = 0.0,
        betas: tuple[float, float] = (0.9, 0.99),
        warmup_steps: int = 20,
        min_lr_ratio: float = 1.0,
        num_logged_samples: int = 4,
        lora: dict | None = None,
        gradient_checkpointing: bool = False,
    ):
        """On-policy distillation on prompt rows (`DATA_KIND` prompt). The defaults are conf/algo/distill.yaml's,
        where each option is explained beside its value.

        Args:
            teacher: the frozen teacher: a `transformers` causal LM, a local checkpoint directory, or a factory called
                as `teacher(tokenizer=...)` (the config's partial of `from_pretrained`); its vocabulary and tokenizer
                must be the student's.
            reward, rollout, env: the verifier of held-out pass@k (and of the train pass rate of sampled steps), the
                sampling engine's factory, multi-turn episodes (None: one completion per prompt).
            lmbda: the fraction of steps whose completions the student samples (GKD's lambda); the others train on
                the rows' `completion` column.
            beta: the generalized JSD's (0 forward KL, 0.5 JSD, 1 reverse KL); temperature: of sampling and of both
                models' distributions in the divergence.
            num_generations: completions sampled per prompt.
            micro_batch_size, max_tokens_per_micro_batch: the step's samples in micro-batches (memory).
            val_num_samples, val_temperature, pass_threshold, truncated_reward, reward_on_error: held-out pass@k as
                RLVR measures it (the teacher's own pass@1 is comparable).
            seed: the sampling noise's and the lmbda coin's (a resumed run draws the same).
            The rest: `LMModule`'s."""
        super().__init__(net, tokenizer, reward=reward, rollout=rollout, env=env, val_num_samples=val_num_samples,
                         lr=lr, weight_decay=weight_decay, betas=betas, warmup_steps=warmup_steps,
                         min_lr_ratio=min_lr_ratio, max_new_tokens=max_new_tokens,
                         num_logged_samples=num_logged_samples, lora=lora, gradient_checkpointing=gradient_checkpointing)
        check_options(lmbda=lmbda, beta=beta, temperature=temperature, num_generations=num_generations,
                      micro_batch_size=micro_batch_size, multi_turn=env is not None)
        self.check_micro_batches(micro_batch_size, max_tokens_per_micro_batch)
        path = getattr(teacher, "keywords", {}).get("path") if not isinstance(teacher, (str, Path)) else str(teacher)
        model = language_model(teacher, self.tokenizer)
        check_teacher(model, self.model, self.tokenizer, path)
        self.teacher = model.requires_grad_(False).eval()  # never trains; in frozen_models (eval mode, FSDP2 shards)
        self.n_teacher = sum(p.numel() for p in self.teacher.parameters())

    @staticmethod
    def check_config(cfg) -> None:
        """Before any work (train.py calls it first, before the warm start): the teacher is named and exists, and
        `SamplingModule`'s checks."""
        from omegaconf import OmegaConf

        path = OmegaConf.select(cfg, "teacher.pretrained", default=None, throw_on_missing=False)
        if OmegaConf.is_missing(cfg, "teacher") or OmegaConf.is_missing(cfg.teacher, "pretrained") or not path:
            raise ValueError("teacher.pretrained: required, the directory of the teacher (any causal LM checkpoint "
                             "sharing the student's tokenizer, e.g. the hf/ export of `python train.py algo=rlvr`)")
        if not Path(path).is_dir():
            raise FileNotFoundError(f"teacher.pretrained={path!r} is not a directory holding an HF checkpoint")
        a = cfg.algo
        check_options(lmbda=a.lmbda, beta=a.beta, temperature=a.temperature, num_generations=a.num_generations,
                      micro_batch_size=a.micro_batch_size, multi_turn=a.get("env") is not None)
        SamplingModule.check_config(cfg)

    def frozen_models(self) -> list[torch.nn.Module]:
        teacher = [self.teacher] if hasattr(self, "teacher") else []
        return super().frozen_models() + teacher

    # ------------------------------------------------------------------ state: the teacher stays out of checkpoints
    def on_save_checkpoint(self, checkpoint: dict) -> None:
        super().on_save_checkpoint(checkpoint)
        if not self.sharded:  # (FSDP2's distributed checkpoint expects every key it was given)
            state = checkpoint.get("state_dict", {})
            for k in [k for k in state if k.startswith("teacher.")]:
                del state[k]

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        super().on_load_checkpoint(checkpoint)
        state = checkpoint.get("state_dict")
        if state is not None and not any(k.startswith("teacher.") for k in state):
            state.update({f"teacher.{k}": v for k, v in self.teacher.state_dict().items()})  # as loaded

    # ------------------------------------------------------------------ training
    def on_policy_step(self, step: int) -> bool:
        """GKD's coin: the student samples this step's completions with probability lmbda (the same on every process
        and again on resume)."""
        lmbda = self.hparams.lmbda
        return lmbda >= 1.0 or (lmbda > 0.0 and random.Random(f"{self.hparams.seed}:{step}").random() < lmbda)

    def dataset_completions(self, batch: dict) -> Rollout:
        """The rows' own completions (their `completion` column, + <eos>), cut at max_new_tokens: GKD's off-policy
        data."""
        tok, cap = self.tokenizer, self.hparams.max_new_tokens
        ids, cut = [], []
        for i, columns in enumerate(batch.get("columns") or [{}] * len(batch["prompts"])):
            if not isinstance(columns.get("completion"), str):
                raise ValueError(f"algo.lmbda={self.hparams.lmbda} trains off-policy steps on each row's 'completion' "
                                 f"column, which train row {int(batch['index'][i])} does not have as text "
                                 f"(columns: {sorted(columns)}); add it, or set algo.lmbda=1.0 (on-policy only)")
            row = completion_ids(tok, columns["completion"])
            ids.append(row[:cap])
            cut.append(len(row) > cap)
        device = batch["prompt_input_ids"].device
        out, mask = pad(ids, tok.pad_token_id).to(device), pad([[1] * len(r) for r in ids], 0).bool().to(device)
        return Rollout(out, mask, torch.zeros(mask.shape, device=device), torch.tensor(cut, device=device))

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        hp = self.hparams
        t0 = time.perf_counter()
        on_policy = self.on_policy_step(self.global_step)
        if on_policy:  # the student as the last step left it
            self.engine.load_weights(self.model.state_dict())
            roll, texts = sample(self.engine, self.tokenizer, self.model, batch, hp.num_generations,
                                 max_new_tokens=hp.max_new_tokens, temperature=hp.temperature, top_p=1.0,
                                 generator=self.noise("train", self.global_step), env=self.env)
        else:
            roll, texts = self.dataset_completions(batch), None
        t_gen = time.perf_counter() - t0
        g = roll.completion_ids.size(0) // batch["prompt_input_ids"].size(0)
        ranges = plan(self, batch["prompt_attention_mask"], roll.lengths, g, hp.micro_batch_size,
                      hp.max_tokens_per_micro_batch)
        # TRL's normaliser: the completion tokens of the whole step; each process's share of the gradient is its
        # sum over that count's per-process mean, DDP's average over processes then gives the step's mean
        n_tokens = gather(self, roll.loss_mask.sum().view(1)).sum().clamp(min=1)
        normalizer = n_tokens.float() / self.trainer.world_size
        opt = self.optimizers()
        opt.zero_grad(set_to_none=True)
        div_sum, ent_sum = torch.zeros((), device=self.device), torch.zeros((), device=self.device)
        for s, e in ranges:
            ids, pmask, cids, cmask, _, group = micro_batch(batch, roll, g, s, e, hp.temperature)
            keep = roll.loss_mask[s:e, : cids.size(1)].bool()  # the student's own tokens
            h_s = completion_hidden(self.model, ids, pmask, cids, cmask, group)[keep]
            with torch.no_grad():
                h_t = completion_hidden(self.teacher, ids, pmask, cids, cmask, group)[keep]
            div, ent = head_divergence(self.model, h_s, self.teacher, h_t, hp.beta, hp.temperature,
                                       with_entropy=True)
            self.manual_backward(div.sum() / normalizer)
            div_sum, ent_sum = div_sum + div.detach().sum(), ent_sum + ent.sum()
        opt.step()  # clipped in `on_before_optimizer_step`
        self.lr_schedulers().step()
        trained = [encoded_tokens(batch["prompt_attention_mask"], roll.lengths, g, ranges, shared)
                   for shared in (shares_prompt_cache(self.model), True)]  # the student's pass, the teacher's
        self.log_step(batch, roll, texts, on_policy, (div_sum, ent_sum), trained, t_gen)
        return div_sum / n_tokens

    def log_step(self, batch: dict, roll: Rollout, texts: list[str] | None, on_policy: bool,
                 sums: tuple[torch.Tensor, torch.Tensor], trained: list[int], t_gen: float) -> None:
        """The step's metrics over every process, in TRL's `DistillationTrainer` names where it has them (`loss`: the
        mean divergence per completion token; `entropy`; `completions/*`), the FLOPs counted (the student's sampling
        and training, the teacher's forward pass, over the tokens each encoded: `trained`) and, on sampled steps, the
        verifier's pass rate."""
        div_sum, ent_sum = sums
        b = len(batch["prompts"])
        lengths, m = roll.loss_mask.sum(-1).float(), roll.loss_mask
        n_prompt = batch["prompt_attention_mask"].sum().float()  # prefilled once per prompt by the engine
        local = torch.stack([div_sum, ent_sum, m.sum().float(), lengths.new_tensor(float(lengths.numel())),
                             lengths.sum(), roll.truncated.float().sum(), n_prompt + roll.lengths.sum().float(),
                             lengths.new_tensor(float(trained[0])), lengths.new_tensor(float(trained[1]))])
        extremes = torch.stack([lengths.min(), -lengths.max()])
        all_ = gather(self, torch.cat([local.double(), extremes.double()]).view(1, -1))
        tot, lo = all_[:, : local.numel()].sum(0), all_[:, local.numel() :].min(0).values
        div, ent, n_tok, n_seq, len_sum, n_cut, sampled, student, teacher = tot.tolist()
        self.compute += (2 * self.n_params * sampled * on_policy  # the student samples (a prompt prefilled once)
                         + 2 * self.n_teacher * teacher + 6 * self.n_params * student)  # the teacher scores, the student trains
        self.samples += int(n_seq) if on_policy else 0
        log = {"loss": div / max(n_tok, 1), "entropy": ent / max(n_tok, 1), "on_policy": float(on_policy),
               "completions/mean_length": len_sum / max(n_seq, 1), "completions/min_length": float(lo[0]),
               "completions/max_length": float(-lo[1]), "completions/clipped_ratio": n_cut / max(n_seq, 1),
               "samples": float(self.samples), "compute_flops": self.compute}
        if texts is not None:  # sampled: how often the student passes (never in the loss)
            r, passed, _ = self.score(batch, texts, roll)
            stats = gather(self, torch.stack([r.sum(), passed.float().sum(), r.new_tensor(float(r.numel()))]).view(1, -1))
            s = stats.sum(0)
            log.update({"reward/mean": float(s[0] / s[2]), "pass_rate": float(s[1] / s[2])})
        for k, v in log.items():
            self.log(f"train/{k}", v, prog_bar=k in ("loss", "pass_rate"), batch_size=b)
        self.log("perf/gen_tokens_per_s", float(roll.lengths.sum()) / max(t_gen, 1e-9), batch_size=b)
