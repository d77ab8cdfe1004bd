"""Supervised fine-tuning: next-token cross-entropy on the completion tokens only.

    L_SFT(theta) = - (1 / N) sum_{(x, y)} sum_{t=1}^{|y|} log pi_theta(y_t | x, y_<t),

N the number of completion tokens in the batch; prompt and padding tokens carry label -100.
"""

from __future__ import annotations

import torch
from torchmetrics import MeanMetric
from torchmetrics.classification import MulticlassAccuracy

from src.lightning_modules.lm import LMModule, masked_nll


class SFTModule(LMModule):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        vocab = self.model.get_output_embeddings().out_features
        # one metric object per stage (Lightning's convention: train_acc, val_acc, test_acc)
        for stage in ("train", "val", "test"):
            setattr(self, f"{stage}_token_acc", MulticlassAccuracy(num_classes=vocab, average="micro", ignore_index=-100))
        self.val_loss, self.test_loss = MeanMetric(), MeanMetric()

    def forward(self, batch: dict) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        logits = self.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        loss, n_tokens = masked_nll(logits, batch["labels"])
        return loss, n_tokens, logits

    def _token_accuracy(self, logits: torch.Tensor, labels: torch.Tensor, stage: str) -> None:
        acc = getattr(self, f"{stage}_token_acc")
        acc(logits[:, :-1].argmax(-1), labels[:, 1:])
        self.log(f"{stage}/token_accuracy", acc, on_step=stage == "train", on_epoch=stage != "train")

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        loss, n_tokens, logits = self(batch)
        self.log("train/loss", loss, prog_bar=True, batch_size=batch["input_ids"].size(0))
        self.log("train/completion_tokens", n_tokens.float(), reduce_fx="sum", batch_size=1)
        self._token_accuracy(logits.detach(), batch["labels"], "train")
        return loss

    def _eval_step(self, batch: dict, batch_idx: int, stage: str) -> None:
        loss, n_tokens, logits = self(batch)
        mean = getattr(self, f"{stage}_loss")
        mean.update(loss, weight=n_tokens)  # token-weighted mean over the split
        self.log(f"{stage}/loss", mean, on_epoch=True, prog_bar=stage == "val")
        self._token_accuracy(logits, batch["labels"], stage)
        self.eval_generation(batch, stage, batch_idx)

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        self._eval_step(batch, batch_idx, "val")

    def test_step(self, batch: dict, batch_idx: int) -> None:
        self._eval_step(batch, batch_idx, "test")
