"""A reward model from binary comparisons (the lecture's RLHF, step 2; Ouyang et al. 2022, InstructGPT):
a `transformers` sequence classifier with one output, r_phi(x, y) = the score head at the last token of
prompt + completion, trained on preference pairs with the Bradley-Terry likelihood

    P(y_w > y_l | x) = sigma(r_phi(x, y_w) - r_phi(x, y_l))
    L = -log sigma(r_phi(x, y_w) - r_phi(x, y_l) - m)  +  c * (r_phi(x, y_w) + r_phi(x, y_l))^2

with an optional per-pair margin m (a row's `margin`: Llama 2's graded preferences; 0 when absent) and
TRL's `center_rewards_coefficient` c (Eisenstein et al. 2023), which pins the scale's free offset near 0.

The classifier is built from the policy's network (`model=`): its transformer stack and a new score head,
so the embedded default starts from the SFT warm start (InstructGPT initialises its reward model from the
SFT model) and `model=hf model.pretrained=DIR` from any local checkpoint. The export (`hf/`) loads with
`AutoModelForSequenceClassification.from_pretrained`; RLVR scores with it through `reward=model`.
"""

from __future__ import annotations

import copy
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torchmetrics import MaxMetric, MeanMetric, MinMetric
from transformers import AutoModelForSequenceClassification, PreTrainedModel

from genlight.callbacks.wandb_axes import STEP
from genlight.lightning_modules.lm import LMModule
from genlight.models.lm import language_model

# TRL RewardTrainer's metric names, plus the mean reward of each side
STATS = ("accuracy", "margin", "rewards/chosen", "rewards/rejected", "mean_reward", "loss")


def bradley_terry_loss(r_chosen: torch.Tensor, r_rejected: torch.Tensor, margin: torch.Tensor | None = None,
                       center_coefficient: float = 0.0) -> torch.Tensor:
    """The mean over pairs of -log sigma(r_w - r_l - m), plus c * mean((r_w + r_l)^2)."""
    diff = r_chosen - r_rejected - (margin if margin is not None else 0.0)
    loss = -F.logsigmoid(diff).mean()
    if center_coefficient:
        loss = loss + center_coefficient * ((r_chosen + r_rejected) ** 2).mean()
    return loss


def sequence_rewards(model, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """r_phi of each right-padded row (float32): the classifier's own forward, which reads its score at the row's
    last token that is not padding (as `AutoModelForSequenceClassification` does for any user)."""
    return model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits[:, 0].float()


def as_reward_model(lm: PreTrainedModel, pad_token_id: int) -> PreTrainedModel:
    """A one-output sequence classifier of `lm`'s architecture holding `lm`'s transformer stack (a causal LM's
    weights; the score head is new, from the global RNG: the run's seed). A sequence classifier (a reward model
    loaded by `model=hf`, by its config's architecture) is returned as it is, its trained score head included."""
    if type(lm).__name__.endswith("ForSequenceClassification"):  # a reward model's export, trained score head kept
        if lm.config.num_labels != 1:
            raise ValueError(f"model.pretrained holds a classifier with {lm.config.num_labels} outputs; a reward model "
                             "has one (num_labels=1)")
        return lm
    config = copy.deepcopy(lm.config)
    config.num_labels, config.pad_token_id, config.architectures = 1, pad_token_id, None
    rm = AutoModelForSequenceClassification.from_config(config).to(lm.dtype)
    getattr(rm, rm.base_model_prefix).load_state_dict(getattr(lm, lm.base_model_prefix).state_dict())
    return rm


class RewardModelModule(LMModule):
    LORA_TASK = "SEQ_CLS"
    DASHBOARD = [  # the W&B workspace's sections (sweeps/dashboard.py)
        ("Bradley-Terry", [
            ("line", "preference accuracy P(r_w > r_l)", STEP, ["train/accuracy", "val/accuracy"]),
            ("line", "margin r_w - r_l", STEP, ["train/margin", "val/margin"]),
            ("line", "loss -log sigma(r_w - r_l - m)", STEP, ["train/loss", "val/loss"]),
            ("line", "rewards of chosen and rejected", STEP, ["val/rewards/chosen", "val/rewards/rejected"]),
            ("line", "reward range (val)", STEP, ["val/min_reward", "val/mean_reward", "val/max_reward"]),
        ]),
        ("Samples", [("table", "val/samples")]),
    ]

    DATA_KIND = "preference"

    def __init__(
        self,
        net: PreTrainedModel | str | Callable[..., PreTrainedModel],
        tokenizer=None,
        *,
        center_rewards_coefficient: float = 0.01,
        lr: float = 3e-4,
        weight_decay: float = 0.0,
        betas: tuple[float, float] = (0.9, 0.95),
        warmup_steps: int = 20,
        min_lr_ratio: float = 0.1,
        num_logged_samples: int = 8,
        lora: dict | None = None,
        gradient_checkpointing: bool = False,
    ):
        """A Bradley-Terry reward model on preference pairs (`DATA_KIND` preference), built from `net`: a causal LM
        (its transformer stack and a new one-output score head) or a reward model's export (its head kept). The
        defaults are conf/algo/reward_model.yaml's.

        Args:
            center_rewards_coefficient: c in + c (r_w + r_l)^2 (TRL's; pins the reward scale's offset near 0).
            The rest: `LMModule`'s (no generation: a reward model scores)."""
        super().__init__(net, tokenizer, lr=lr, weight_decay=weight_decay, betas=betas, warmup_steps=warmup_steps,
                         min_lr_ratio=min_lr_ratio, max_new_tokens=0, num_logged_samples=num_logged_samples, lora=lora,
                         gradient_checkpointing=gradient_checkpointing)
        if center_rewards_coefficient < 0:
            raise ValueError(f"algo.center_rewards_coefficient={center_rewards_coefficient}: must be >= 0")
        for stage in ("val", "test"):  # pair-weighted means over the split (summed across processes), min / max
            stats = {k.replace("/", "_"): MeanMetric() for k in STATS}
            stats |= {"min_reward": MinMetric(), "max_reward": MaxMetric()}
            setattr(self, f"{stage}_stats", torch.nn.ModuleDict(stats))

    def build_model(self, net, tokenizer) -> PreTrainedModel:
        return as_reward_model(language_model(net, tokenizer), tokenizer.pad_token_id)

    @staticmethod
    def check_config(cfg) -> None:
        """Before any work (train.py calls it first)."""
        if cfg.data.get("packing"):
            raise ValueError("data.packing=true: the reward model reads its score at each sequence's last token of a "
                             "padded row; set data.packing=false for algo=reward_model")

    def forward(self, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        """r_phi of the chosen and of the rejected completions (the batch's 2B right-padded rows, one forward)."""
        return sequence_rewards(self.model, batch["input_ids"], batch["attention_mask"]).chunk(2)

    def _step(self, batch: dict, stage: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        r_w, r_l = self(batch)
        loss = bradley_terry_loss(r_w, r_l, batch.get("margins"), self.hparams.center_rewards_coefficient)
        n = r_w.numel()
        both = torch.cat([r_w, r_l]).detach()
        values = {"loss": loss.detach().expand(n), "accuracy": (r_w > r_l).float(), "margin": (r_w - r_l).detach(),
                  "rewards/chosen": r_w.detach(), "rewards/rejected": r_l.detach(), "mean_reward": both,
                  "min_reward": both, "max_reward": both}
        for k, v in values.items():
            if stage == "train":  # this step's values
                value = v.min() if k == "min_reward" else v.max() if k == "max_reward" else v.mean()
                self.log(f"train/{k}", value, prog_bar=k == "accuracy", batch_size=n)
            else:  # over the split
                metric = getattr(self, f"{stage}_stats")[k.replace("/", "_")]
                metric.update(v)
                self.log(f"{stage}/{k}", metric, on_epoch=True, prog_bar=k == "accuracy", batch_size=n)
        return loss, r_w.detach(), r_l.detach()

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        return self._step(batch, "train")[0]

    def _eval_step(self, batch: dict, batch_idx: int, stage: str) -> None:
        _, r_w, r_l = self._step(batch, stage)
        if batch_idx == 0:  # a few pairs with their scores, for the W&B table
            n, b = self.hparams.num_logged_samples, len(r_w)
            text = self.tokenizer.batch_decode(batch["input_ids"], skip_special_tokens=True)
            self._samples = [[text[i], text[b + i], float(r_w[i]), float(r_l[i])] for i in range(min(n, b))]

    def on_validation_epoch_end(self) -> None:
        self.log_samples("val", columns=("chosen", "rejected", "reward_chosen", "reward_rejected"))

    def on_test_epoch_end(self) -> None:
        self.log_samples("test", columns=("chosen", "rejected", "reward_chosen", "reward_rejected"))
