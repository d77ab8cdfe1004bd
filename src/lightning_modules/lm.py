"""What every language-model algorithm shares: the policy, AdamW with warm-up + cosine,
greedy generation for evaluation, and sample tables for W&B (the log-prob kernels live with the models:
src/models/logps.py).

The algorithms themselves (SFT, DPO, ...) live one per file beside this one.
"""

from __future__ import annotations

import contextlib
import copy
import os
from collections.abc import Callable
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.loggers import WandbLogger
from transformers import AutoModelForCausalLM, PreTrainedModel

from genlight.callbacks.wandb_axes import STEP
from genlight.datamodules.lm import batch_keys, row_kind
from genlight.metrics import ExactMatch
from genlight.models.lm import (
    causal_lm,
    fsdp2_shard,
    is_sequence_classifier,
    is_sharded,
    language_model,
    reshard,
)
from genlight.models.tokenizer import load_tokenizer
from genlight.optim import adamw_cosine
from genlight.utils.run import attached_trainer

# the W&B dashboard section of greedy evaluation (sweeps/dashboard.py reads each module's `DASHBOARD`)
EVAL_PANELS = ("Evaluation", [
    ("line", "held-out exact match (greedy)", STEP, ["val/exact_match"]),
    ("line", "held-out loss", STEP, ["val/loss"]),
    ("table", "val/samples"),
])


def policy(model: PreTrainedModel, lora: dict | None = None, gradient_checkpointing: bool = False,
           task_type: str = "CAUSAL_LM"):
    """The trained policy: the model, with LoRA adapters (peft) when `lora.r` is set (`model.lora.*`: r, alpha,
    dropout, target_modules, whose defaults live in conf/model/_policy.yaml), and non-reentrant gradient
    checkpointing when asked (`model.gradient_checkpointing`). `task_type` is peft's: SEQ_CLS (a reward model)
    also trains the new score head in full."""
    if gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if lora and lora.get("r"):
        from peft import LoraConfig, get_peft_model

        target = lora["target_modules"]
        model = get_peft_model(model, LoraConfig(
            r=lora["r"], lora_alpha=lora["alpha"], lora_dropout=lora["dropout"],
            target_modules=list(target) if not isinstance(target, str) else target, task_type=task_type))
    return model


class LMModule(L.LightningModule):
    """What every language-model algorithm shares (not trained itself; SFTModule, DPOModule, ... extend it).

    Args:
        net: the network to train: a `transformers` causal LM, a local checkpoint directory, or a factory called as
            `net(tokenizer=...)` that returns one (`genlight.tiny_llama`; the configs' `model.net`).
        tokenizer: its tokenizer; None with a checkpoint directory: the directory's own.
        lr, weight_decay, betas: AdamW's (weight decay on matrices only, never on norms and biases).
        warmup_steps, min_lr_ratio: linear warm-up over this many optimizer steps, then cosine decay to
            `min_lr_ratio * lr` at the trainer's `max_steps` (1.0: constant).
        max_new_tokens: the longest completion generated (greedy evaluation; RLVR's sampling).
        num_logged_samples: rows of the W&B tables of samples.
        lora: LoRA adapters (peft): a dict with `r` (None: full fine-tuning), `alpha`, `dropout`, `target_modules`.
        gradient_checkpointing: recompute activations in the backward pass (non-reentrant).

    Each algorithm's constructor gives these its recipe's defaults (its conf/algo/<name>.yaml, tested equal), declares
    the rows it trains on (`DATA_KIND`, a `data.kind`) and refuses a DataModule of another kind; the batch format of
    each kind is in docs/plugin.md."""

    LORA_TASK = "CAUSAL_LM"  # peft's task type for LoRA adapters
    DATA_KIND = "sft"  # the rows it trains on: a data.kind (genlight.datamodules.lm.ROW_KINDS, or an import path)

    def __init__(
        self,
        net: PreTrainedModel | str | Callable[..., PreTrainedModel],
        tokenizer=None,
        *,
        lr: float,
        weight_decay: float,
        betas: tuple[float, float],
        warmup_steps: int,
        min_lr_ratio: float,
        max_new_tokens: int,
        num_logged_samples: int,
        lora: dict | None = None,
        gradient_checkpointing: bool = False,
    ):
        super().__init__()
        if lr <= 0:
            raise ValueError(f"algo.lr={lr}: must be > 0")
        if not 0 <= min_lr_ratio <= 1:
            raise ValueError(f"algo.min_lr_ratio={min_lr_ratio}: must be in [0, 1]")
        if tokenizer is None:
            if not isinstance(net, (str, os.PathLike)):
                raise ValueError(f"tokenizer: required with net={type(net).__name__} (only a checkpoint directory "
                                 "brings its own)")
            tokenizer = load_tokenizer(str(net))
        self.save_hyperparameters(ignore=["net", "tokenizer", "teacher", "reward", "rollout", "env"], logger=False)
        self.tokenizer = tokenizer
        # trained in train mode: a checkpoint loads in eval mode (from_pretrained), and Lightning keeps each module's mode
        self.model = policy(self.build_model(net, tokenizer), lora, gradient_checkpointing, self.LORA_TASK).train()
        self.val_exact_match, self.test_exact_match = ExactMatch(), ExactMatch()
        self._samples: list[list] = []
        self.has_reference = False  # init_reference
        self.ref_model: PreTrainedModel | None = None  # pi_ref as its own copy (without LoRA)
        self._ref_cache: dict = {}
        self._checked_batches: set[str] = set()

    def build_model(self, net, tokenizer) -> PreTrainedModel:
        """The network this algorithm trains, from `net` (`language_model`): a causal LM (a reward model converts
        one)."""
        model = language_model(net, tokenizer)
        if is_sequence_classifier(model.config) or model.get_output_embeddings() is None:
            raise ValueError(f"model.pretrained holds a {type(model).__name__} (a reward model's sequence classifier), "
                             f"not a causal LM: {type(self).__name__} trains a policy; pass a causal LM checkpoint "
                             "(a reward model is used by algo=reward_model, eval.py algo=reward_model, or reward=model)")
        return model

    # ------------------------------------------------------------------ the data contract
    def setup(self, stage: str) -> None:
        """Refuses a DataModule whose rows are of another kind than `DATA_KIND` (an LMDataModule's `kind`, or any
        DataModule's `kind` attribute), naming both, before any batch."""
        dm = getattr(attached_trainer(self), "datamodule", None)
        kind = getattr(dm, "kind", None)
        if kind is not None and row_kind(kind).collate is not row_kind(self.DATA_KIND).collate:  # batches differ
            raise ValueError(f"{type(self).__name__} trains on data.kind={self.DATA_KIND!r} rows, and the DataModule "
                             f"({type(dm).__name__}) gives data.kind={kind!r} rows: build it with "
                             f"kind={type(self).__name__}.DATA_KIND (in a config: data.kind={self.DATA_KIND})")

    def _check_batch(self, batch, stage: str) -> None:
        """The first batch of each stage holds the keys of `DATA_KIND`'s batches (`batch_keys`), or stops naming the
        ones it lacks (a DataModule of one's own)."""
        if stage in self._checked_batches:
            return
        self._checked_batches.add(stage)
        need = batch_keys(self.DATA_KIND)
        missing = [k for k in need if not isinstance(batch, dict) or k not in batch]
        if missing:
            have = sorted(batch) if isinstance(batch, dict) else type(batch).__name__
            raise ValueError(f"{type(self).__name__}: a {stage} batch lacks {missing} (data.kind={self.DATA_KIND!r} "
                             f"batches hold {list(need)}; this one has {have}); see docs/plugin.md for the format")

    def on_train_batch_start(self, batch, batch_idx: int) -> None:
        self._check_batch(batch, "train")

    def on_validation_batch_start(self, batch, batch_idx: int, dataloader_idx: int = 0) -> None:
        self._check_batch(batch, "val")

    def on_test_batch_start(self, batch, batch_idx: int, dataloader_idx: int = 0) -> None:
        self._check_batch(batch, "test")

    @property
    def sharded(self) -> bool:
        """Whether the policy is sharded over processes (FSDP2): forward passes are then collective."""
        return is_sharded(self.model)

    @property
    def uses_lora(self) -> bool:
        return hasattr(self.model, "peft_config")

    # ------------------------------------------------------------------ the reference policy
    def init_reference(self, ref_pretrained: str | None = None) -> None:
        """pi_ref: another local checkpoint, or the initial policy (pi_0 = pi_ref); frozen (no gradients) and
        always in eval mode. Without LoRA it is a copy of the initial policy; with LoRA it is the policy with its
        adapters disabled (the base model: no second copy in memory, as TRL does). Its weights are part of the
        module, so of every checkpoint."""
        self.has_reference = True
        if ref_pretrained or not self.uses_lora:
            ref = (AutoModelForCausalLM.from_pretrained(ref_pretrained, local_files_only=True) if ref_pretrained
                   else copy.deepcopy(self.model))
            self.ref_model = ref.requires_grad_(False).eval()

    @contextlib.contextmanager
    def reference(self):
        """The model to run pi_ref's forward passes with (no gradients)."""
        if self.ref_model is not None:
            yield self.ref_model
            return
        was_training = self.model.training
        self.model.eval()  # no LoRA dropout in pi_ref
        try:
            with self.model.disable_adapter():
                yield self.model
        finally:
            self.model.train(was_training)

    @torch.no_grad()
    def refresh_reference(self, alpha: float) -> None:
        """TR-DPO's update pi_ref <- alpha pi_theta + (1 - alpha) pi_ref (alpha = 1: a copy); clears the cache.

        With LoRA (pi_ref = the base W, pi_theta = W + dW with dW = s B A), the same update is exact on the
        weights: W <- W + alpha dW and B <- (1 - alpha) B, so that pi_ref becomes W + alpha dW and the policy
        stays W + dW (a hard update merges the adapter into the base and restarts it at B = 0)."""
        if self.ref_model is not None:
            if self.sharded:  # both sides as their shards (each process updates its own)
                reshard(self.ref_model)
                reshard(self.model)
            for p_ref, p in zip(self.ref_model.parameters(), self.model.parameters(), strict=True):
                p_ref.lerp_(p.to(p_ref.dtype), alpha)  # p_ref + alpha (p - p_ref)
        else:
            from peft.tuners.lora import LoraLayer

            for layer in self.model.modules():
                if isinstance(layer, LoraLayer):
                    for name in layer.active_adapters:
                        base = layer.get_base_layer().weight
                        base.add_(layer.get_delta_weight(name).to(base.dtype), alpha=alpha)
                        layer.lora_B[name].weight.mul_(1 - alpha)
        self._ref_cache.clear()

    def cached_reference(self, keys: list, compute: Callable[[], tuple[torch.Tensor, ...]], enabled: bool = True):
        """The reference's per-example values (e.g. log pi_ref of chosen and rejected), computed once per key
        while the reference does not change (`refresh_reference` clears the cache)."""
        if enabled and keys and all(k in self._ref_cache for k in keys):
            columns = zip(*(self._ref_cache[k] for k in keys))
            return tuple(torch.tensor(c, dtype=torch.float32, device=self.device) for c in columns)
        with torch.no_grad():
            values = compute()
        if enabled:
            self._ref_cache.update(zip(keys, zip(*(v.tolist() for v in values))))
        return values

    def frozen_models(self) -> list[torch.nn.Module]:
        """Copies of the policy that never train (the reference; RLVR's lagged generator)."""
        return [self.ref_model] if self.ref_model is not None else []

    def train(self, mode: bool = True):
        super().train(mode)
        for m in self.frozen_models():
            m.eval()  # no dropout in pi_ref / pi_gen, whatever Lightning does to the module
        return self

    def _frozen_modules(self) -> list[torch.nn.Module]:
        """Every module of the frozen copies, and the containers that hold nothing else (RLVR's reward-model
        wrapper)."""
        frozen = {id(x) for m in self.frozen_models() for x in m.modules()}
        containers = [m for m in self.modules() if m is not self and id(m) not in frozen
                      and len(children := list(m.modules())) > 1 and all(id(c) in frozen for c in children[1:])]
        return [m for m in self.modules() if id(m) in frozen] + containers

    def on_fit_start(self) -> None:
        """Lightning warns, at the start of training, of every module in eval mode (it puts none in train mode
        itself). The frozen copies are in eval mode by design: they are flagged as training for that check alone
        (`on_train_start` puts them back; in between only the sanity validation runs, with every module in eval
        mode and back), so that the warning stays on and names exactly the modules that would train in eval mode."""
        for m in self._frozen_modules():
            m.training = True

    def on_train_start(self) -> None:
        for m in self._frozen_modules():
            m.training = False

    def on_fit_end(self) -> None:  # a fit with no step left to take (resumed at max_steps) skips on_train_start
        self.on_train_start()

    # ------------------------------------------------------------------ FSDP2
    def configure_model(self) -> None:
        """Under `trainer=fsdp` (ModelParallelStrategy), shard the policy and its frozen copies (reference,
        lagged generator) over the data-parallel mesh; a no-op for every other strategy."""
        if self.device_mesh is None or self.sharded:  # (test after fit: already sharded)
            return
        for model in [self.model, *self.frozen_models()]:
            fsdp2_shard(model, self.device_mesh["data_parallel"])

    def _unsharded_policy(self):
        """The policy with full (unsharded) weights, for the export: the model itself, or under FSDP2 a CPU copy
        built from the gathered state dict (a collective: every process calls it; None on the other ranks)."""
        if not self.sharded:
            return self.model
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        state = get_model_state_dict(self.model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        if not self.trainer.is_global_zero:
            return None
        lm = causal_lm(self.model)
        full = type(lm)(lm.config)
        if self.uses_lora:
            from peft import get_peft_model

            full = get_peft_model(full, self.model.peft_config["default"])
        missing, unexpected = full.load_state_dict(state, strict=False)
        bad = [k for k in missing if not k.endswith("lm_head.weight")] + list(unexpected)  # a tied head has no key
        if bad:
            raise RuntimeError(f"FSDP2 export: the gathered state does not fit {type(lm).__name__}: {bad[:5]}")
        return full

    # ------------------------------------------------------------------ export
    def export_pretrained(self, path) -> None:
        """The policy and tokenizer as an ordinary HF directory (`AutoModelForCausalLM.from_pretrained`); with
        LoRA, the adapters merged into the base weights there, and the adapter alone in `path/adapter/`. Called
        on every process (under FSDP2 the weights are gathered first); only rank 0 writes."""
        from genlight.callbacks.hf_export import quiet_progress

        model = self._unsharded_policy()
        if model is None or self.global_rank != 0:  # global_rank: 0 without a trainer
            return
        path = Path(path)
        with quiet_progress():  # no "Writing model shards" bar for a one-shard model in our logs
            if self.uses_lora:
                model.save_pretrained(path / "adapter")
                (model if model is not self.model else copy.deepcopy(model)).merge_and_unload().save_pretrained(path)
            else:
                model.save_pretrained(path)
        self.tokenizer.save_pretrained(path)

    # ------------------------------------------------------------------ optimisation
    def configure_optimizers(self):
        hp = self.hparams
        # nanoGPT's split: matrices decay, vectors (norms, biases) do not.
        decay = [p for p in self.model.parameters() if p.requires_grad and p.dim() >= 2]
        no_decay = [p for p in self.model.parameters() if p.requires_grad and p.dim() < 2]
        groups = [{"params": decay, "weight_decay": hp.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
        return adamw_cosine(self, groups, hp.lr, hp.betas, hp.warmup_steps, hp.min_lr_ratio)

    # ------------------------------------------------------------------ generation
    @torch.no_grad()
    def generate(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, **kwargs) -> list[str]:
        """Greedy completions (text up to <eos>) of left-padded prompts."""
        tok = self.tokenizer
        out = self.model.generate(
            input_ids=input_ids,
            attention_mask=attention_mask,
            max_new_tokens=kwargs.pop("max_new_tokens", self.hparams.max_new_tokens),
            do_sample=False,
            pad_token_id=tok.pad_token_id,
            eos_token_id=tok.eos_token_id,
            # sharded weights (FSDP2): every process must run as many forward passes as the slowest one
            synced_gpus=self.sharded,
            **kwargs,
        )
        return tok.batch_decode(out[:, input_ids.size(1) :], skip_special_tokens=True)

    def eval_generation(self, batch: dict, stage: str, batch_idx: int, rows: list[int] | None = None,
                        log: bool = True) -> None:
        """Exact match of greedy completions against the references (of `rows` only, when given: every row is still
        generated, since under FSDP2 every process must run as many forward passes); keep a few for the table.
        `log=False`: the metric is updated, and logged by the module itself (KTO: only where it is defined)."""
        preds = self.generate(batch["prompt_input_ids"], batch["prompt_attention_mask"])
        rows = range(len(preds)) if rows is None else rows
        prompts, preds, refs = ([xs[i] for i in rows] for xs in (batch["prompts"], preds, batch["references"]))
        metric = getattr(self, f"{stage}_exact_match")
        metric.update(preds, refs)
        if log:
            self.log(f"{stage}/exact_match", metric, on_epoch=True, prog_bar=True, batch_size=max(len(preds), 1))
        if batch_idx == 0:
            n = self.hparams.num_logged_samples
            self._samples = [[p, c, r, ExactMatch.match(c, r)] for p, c, r in zip(prompts[:n], preds[:n], refs[:n])]

    def log_table(self, key: str, columns: list[str], data: list[list]) -> None:
        """A W&B table at the current step (the other loggers have no tables)."""
        for logger in self.loggers:
            if isinstance(logger, WandbLogger):
                logger.log_table(key=key, columns=list(columns), data=data, step=self.global_step)

    def log_histogram(self, key: str, values: torch.Tensor) -> None:
        """A W&B histogram at the current step (rank 0's values; the other loggers have no histograms)."""
        if self.trainer.sanity_checking or not self.trainer.is_global_zero or values.numel() == 0:
            return
        for logger in self.loggers:
            if isinstance(logger, WandbLogger):
                import wandb

                logger.experiment.log({key: wandb.Histogram(values.float().cpu().numpy()),
                                       "trainer/global_step": self.global_step})

    def log_samples(self, stage: str, columns=("prompt", "completion", "reference", "correct")) -> None:
        """The W&B table `{stage}/samples` of the rows kept by the first eval batch."""
        if not self._samples or self.trainer.sanity_checking:
            return
        self.log_table(f"{stage}/samples", columns, self._samples)
        self._samples = []

    # ------------------------------------------------------------------ evaluation
    def _eval_step(self, batch: dict, batch_idx: int, stage: str) -> None:
        """One val or test batch (`stage`); each algorithm writes its own."""
        raise NotImplementedError

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        self._eval_step(batch, batch_idx, "val")

    def test_step(self, batch: dict, batch_idx: int) -> None:
        self._eval_step(batch, batch_idx, "test")

    def on_validation_epoch_end(self) -> None:
        self.log_samples("val")

    def on_test_epoch_end(self) -> None:
        self.log_samples("test")
