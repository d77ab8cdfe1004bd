"""Supervised fine-tuning: next-token cross-entropy on the completion tokens only.

    L_SFT(theta) = - (1 / N) sum_{(x, y)} sum_{t=1}^{|y|} log pi_theta(y_t | x, y_<t),

N the number of completion tokens in the batch; prompt and padding tokens carry label -100.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
from collections.abc import Callable
from pathlib import Path

import lightning as L
import torch
import transformers
from torchmetrics import MeanMetric
from torchmetrics.classification import MulticlassAccuracy
from transformers import PreTrainedModel

from genlight.callbacks.validate_at_end import ValidateAtEnd
from genlight.callbacks.wandb_axes import STEP
from genlight.lightning_modules.lm import EVAL_PANELS, LMModule
from genlight.models.logps import labelled_logps

log = logging.getLogger(__name__)


class SFTModule(LMModule):
    # the W&B workspace's sections (sweeps/dashboard.py): ("line", title, x, [y...]) | ("media", ...) | ("table", key)
    DASHBOARD = [
        ("Training", [
            ("line", "completion-only loss", STEP, ["train/loss", "val/loss"]),
            ("line", "next-token accuracy on completions", STEP, ["train/token_accuracy", "val/token_accuracy"]),
            ("line", "learning rate", STEP, ["lr-AdamW"]),
        ]),
        EVAL_PANELS,
    ]

    DATA_KIND = "sft"

    def __init__(
        self,
        net: PreTrainedModel | str | Callable[..., PreTrainedModel],
        tokenizer=None,
        *,
        lr: float = 1e-3,
        weight_decay: float = 0.1,
        betas: tuple[float, float] = (0.9, 0.95),
        warmup_steps: int = 100,
        min_lr_ratio: float = 0.1,
        max_new_tokens: int = 8,
        num_logged_samples: int = 8,
        lora: dict | None = None,
        gradient_checkpointing: bool = False,
    ):
        """Supervised fine-tuning of `net` on prompt -> completion rows (`DATA_KIND` sft), the completion's tokens
        only in the loss. The defaults are conf/algo/sft.yaml's; every argument is `LMModule`'s."""
        super().__init__(net, tokenizer, lr=lr, weight_decay=weight_decay, betas=betas, warmup_steps=warmup_steps,
                         min_lr_ratio=min_lr_ratio, max_new_tokens=max_new_tokens,
                         num_logged_samples=num_logged_samples, lora=lora, gradient_checkpointing=gradient_checkpointing)
        vocab = self.model.get_output_embeddings().out_features
        # one metric object per stage (Lightning's convention: train_acc, val_acc, test_acc)
        for stage in ("train", "val", "test"):
            setattr(self, f"{stage}_token_acc", MulticlassAccuracy(num_classes=vocab, average="micro", ignore_index=-100))
        self.val_loss, self.test_loss = MeanMetric(), MeanMetric()

    def forward(self, batch: dict) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """The loss, the number of completion tokens, and the greedy prediction and target at each of them.
        The LM head runs at the completion tokens only, in chunks (`labelled_logps`): no (batch x length x
        vocabulary) logits. Packed batches (data.packing) carry per-sequence position_ids and no attention mask;
        transformers builds the block-diagonal mask from them only without a KV cache (use_cache=False)."""
        labels = batch["labels"]
        logp, mask, pred = labelled_logps(self.model, batch["input_ids"], labels, batch.get("attention_mask"),
                                          batch.get("position_ids"), argmax=True)
        n_tokens = mask.sum()
        return -logp.sum() / n_tokens.clamp(min=1), n_tokens, pred, labels[:, 1:][mask]

    def _token_accuracy(self, pred: torch.Tensor, target: torch.Tensor, stage: str) -> None:
        acc = getattr(self, f"{stage}_token_acc")
        acc(pred, target)
        self.log(f"{stage}/token_accuracy", acc, on_step=stage == "train", on_epoch=stage != "train")

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        loss, n_tokens, pred, target = self(batch)
        self.log("train/loss", loss, prog_bar=True, batch_size=batch["input_ids"].size(0))
        self.log("train/completion_tokens", n_tokens.float(), reduce_fx="sum", batch_size=1)
        self._token_accuracy(pred, target, "train")
        return loss

    def _eval_step(self, batch: dict, batch_idx: int, stage: str) -> None:
        loss, n_tokens, pred, target = self(batch)
        mean = getattr(self, f"{stage}_loss")
        mean.update(loss, weight=n_tokens)  # token-weighted mean over the split
        self.log(f"{stage}/loss", mean, on_epoch=True, prog_bar=stage == "val")
        self._token_accuracy(pred, target, stage)
        self.eval_generation(batch, stage, batch_idx)


def warm_start(net, tokenizer, datamodule, target: float, max_steps: int, val_every: int = 25, lr: float = 1e-3,
               warmup_steps: int = 50, accelerator: str = "cpu", gradient_clip_val: float | None = 1.0,
               progress_bar: bool = True, max_new_tokens: int = 16):
    """SFT from scratch until the greedy held-out exact match reaches `target` (validated every `val_every`
    steps; Lightning's EarlyStopping with a stopping threshold), at most `max_steps`. DPO and RLVR start from
    such a policy (the lecture: "Pretrain -> SFT on good examples -> ..."). Returns the model and
    {"warm_start/exact_match", "warm_start/steps"}."""
    from lightning.pytorch.callbacks import EarlyStopping

    sft = SFTModule(net=net, tokenizer=tokenizer, lr=lr, warmup_steps=warmup_steps, max_new_tokens=max_new_tokens)

    class Progress(L.Callback):  # the warm start logs nowhere else: its curve in the run's log, one line per check
        def on_validation_end(self, trainer, pl_module):
            em = trainer.callback_metrics.get("val/exact_match")
            if em is not None and not trainer.sanity_checking:
                log.info("Warm start: step %d, val exact match %.3f", trainer.global_step, float(em))

    # Lightning stops when the metric is strictly above the threshold; "reaches the target" is >=
    stop = EarlyStopping(monitor="val/exact_match", mode="max", stopping_threshold=target - 1e-9, patience=10**9,
                         check_on_train_epoch_end=False)
    trainer = L.Trainer(
        accelerator=accelerator, devices=1, max_steps=max_steps, logger=False, enable_checkpointing=False,
        val_check_interval=val_every, check_val_every_n_epoch=None, num_sanity_val_steps=0,
        gradient_clip_val=gradient_clip_val, enable_model_summary=False, enable_progress_bar=progress_bar,
        callbacks=[stop, ValidateAtEnd(), Progress()],
    )
    trainer.fit(sft, datamodule=datamodule)
    reached = float(trainer.callback_metrics["val/exact_match"])
    return sft.model, {"warm_start/exact_match": reached, "warm_start/steps": float(trainer.global_step)}


def warm_start_net(cfg, tokenizer, target: float, max_steps: int, val_every: int = 25, lr: float = 1e-3,
                   warmup_steps: int = 50, batch_size: int = 128, kind: str = "sft", cache_dir: str | None = None):
    """`warm_start=sft` (conf/warm_start/sft.yaml), asked for by an algorithm's YAML: SFT the from-scratch policy on
    the run's data, read as `kind` rows (`data.kind`'s values: an algorithm whose rows are not SFT rows names its
    own, e.g. KTO's desirable rows only), to `target` (`warm_start`) before the algorithm; returns (a `net` factory
    holding it, its metrics), or (None, {}) with a checkpoint (model=hf: start from it), when resuming, or with
    max_steps=0. With `cache_dir`, the result is kept in <cache_dir>/<key>/ (`warm_start_key`) and a later run with
    the same key loads it instead of training: an ablation's rows start from the same policy. The global RNG is then
    re-seeded after the warm start, trained or loaded, so a run is the same whether the cache held it or not."""
    import hydra

    from genlight.datamodules.files import DataError

    if not max_steps or cfg.get("ckpt_path") or "pretrained" in cfg.model:
        return None, {}
    from genlight.models.lm import from_pretrained

    out = Path(cfg.paths.output_dir) / "sft_init"
    cached = Path(cache_dir) / warm_start_key(cfg) if cache_dir else None
    if cached is not None and (cached / "warm_start.json").exists():
        metrics = json.loads((cached / "warm_start.json").read_text())
        model = from_pretrained(tokenizer, str(cached))
        model.save_pretrained(out)
        tokenizer.save_pretrained(out)
        log.info("Warm start: loaded from the cache %s (val exact match %.3f after %d steps); export %s", cached,
                 metrics["warm_start/exact_match"], metrics["warm_start/steps"], out)
        L.seed_everything(cfg.seed, workers=True)
        return (lambda tokenizer: model), metrics
    log.info("Warm start: SFT to val exact match %.2f (at most %d steps) before %s", target, max_steps,
             cfg.algo._target_.rsplit(".", 1)[-1])
    dm = hydra.utils.instantiate(cfg.data, tokenizer=tokenizer, kind=kind, batch_size=batch_size)
    try:
        dm.setup("fit")
    except DataError as e:
        raise DataError(f"{e}\nwarm_start runs SFT on the data, which needs SFT rows; give an SFT checkpoint instead "
                        "(model=hf model.pretrained=DIR) or set warm_start.max_steps=0") from None
    # the greedy check can write every val completion (a tool call is ~80 tokens with the character tokenizer)
    longest = max((len(e["completion_ids"]) for e in dm.examples.get("val", [])), default=16)
    model, metrics = warm_start(
        hydra.utils.instantiate(cfg.model.net), tokenizer, dm, target, max_steps, val_every, lr, warmup_steps,
        cfg.trainer.accelerator, cfg.trainer.get("gradient_clip_val"), cfg.trainer.get("enable_progress_bar", True),
        max(longest, 1))
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    log.info("Warm start: val exact match %.3f after %d steps; export %s (model=hf model.pretrained=%s)",
             metrics["warm_start/exact_match"], metrics["warm_start/steps"], out, out)
    if cached is not None:  # written to a temporary name, then renamed: a run killed mid-write leaves no half entry
        tmp = cached.with_name(f"{cached.name}.tmp{os.getpid()}")
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.copytree(out, tmp)
        (tmp / "warm_start.json").write_text(json.dumps(metrics))
        try:
            tmp.rename(cached)
        except OSError:  # another run stored the same key meanwhile: theirs is the same warm start
            shutil.rmtree(tmp, ignore_errors=True)
        model = from_pretrained(tokenizer, str(cached))  # as a cache hit returns it
        L.seed_everything(cfg.seed, workers=True)
    return (lambda tokenizer: model), metrics


# what does not change the warm start: how the algorithm after it batches and reads the data
_NOT_IN_KEY = {"kind", "batch_size", "eval_batch_size", "num_workers"}


def _without_reward_only(node):
    """`node` without the options of each `_target_` that only score what it makes (its class's `reward_only`, e.g.
    a game's `turn_bonus`): the data a warm start trains on is the same whatever they are."""
    if isinstance(node, list):
        return [_without_reward_only(v) for v in node]
    if not isinstance(node, dict):
        return node
    import hydra

    target = node.get("_target_")
    drop = set(getattr(hydra.utils.get_object(target), "reward_only", ())) if isinstance(target, str) else set()
    return {k: _without_reward_only(v) for k, v in node.items() if k not in drop}


def warm_start_key(cfg) -> str:
    """The warm start's cache key: a hash of everything that determines it (the model's config and tokenizer, the
    data but how the algorithm batches it and how its environment scores, the warm start's settings but the cache's
    place, the seed, the trainer's accelerator and gradient clipping) and of the library versions that compute it."""
    from omegaconf import OmegaConf

    def plain(node):
        return OmegaConf.to_container(node, resolve=True) if OmegaConf.is_config(node) else node

    what = {
        "model": {k: plain(cfg.model[k]) for k in ("net", "tokenizer") if k in cfg.model},
        "data": _without_reward_only({k: plain(v) for k, v in cfg.data.items() if k not in _NOT_IN_KEY}),
        "warm_start": {k: plain(v) for k, v in cfg.warm_start.items() if k != "cache_dir"},
        "seed": cfg.get("seed"),
        "trainer": {k: plain(cfg.trainer.get(k)) for k in ("accelerator", "gradient_clip_val", "precision")},
        "versions": [torch.__version__, L.__version__, transformers.__version__],
    }
    digest = hashlib.sha256(json.dumps(what, sort_keys=True, default=str).encode()).hexdigest()[:16]
    return f"seed{cfg.get('seed')}-{digest}"
