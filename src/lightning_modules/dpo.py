"""Direct Preference Optimization and its loss family (Rafailov et al. 2023), with a frozen
reference policy; TR-DPO's reference refresh (Gorbatovski et al. 2024) is the callback
`genlight.callbacks.ReferenceRefresh`.

With h = [log pi_theta(y_w|x) - log pi_ref(y_w|x)] - [log pi_theta(y_l|x) - log pi_ref(y_l|x)]:

    sigmoid       L = -log sigma(beta h)                          (DPO, the lecture's L_DPO)
                  with label smoothing eps (conservative DPO):
                  L = -(1 - eps) log sigma(beta h) - eps log sigma(-beta h)
    ipo           L = (h - 1 / (2 beta))^2                        (Azar et al. 2023, IPO)
    hinge         L = max(0, 1 - beta h)                          (SLiC-HF, Zhao et al. 2023)
    naive_margin  L = -[log pi_theta(y_w|x) - log pi_theta(y_l|x)]  (the lecture's "Idea 0": no
                  reference; the DPO paper's Table 3 meltdown)
    sft_chosen    L = -log pi_theta(y_w|x) / |y_w|                (the lecture's "Idea 1")

The implicit reward is r_hat(x, y) = beta log pi_theta(y|x) / pi_ref(y|x); its gradient form:
    grad L_DPO = -beta E[ sigma(r_hat(y_l) - r_hat(y_w)) (grad log pi(y_w) - grad log pi(y_l)) ].
Log-probabilities are sums over completion tokens (prompt and padding masked).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torchmetrics import MeanMetric
from transformers import PreTrainedModel

from genlight.callbacks.wandb_axes import STEP
from genlight.lightning_modules.lm import EVAL_PANELS, LMModule
from genlight.models.logps import completion_logps, labelled_logps, packed_completion_logps

LOSS_TYPES = ("sigmoid", "ipo", "hinge", "naive_margin", "sft_chosen")
NEEDS_REF = ("sigmoid", "ipo", "hinge")
STATS = ("rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins", "logps/chosen", "logps/rejected")


def dpo_loss(
    policy_chosen: torch.Tensor,
    policy_rejected: torch.Tensor,
    ref_chosen: torch.Tensor | None,
    ref_rejected: torch.Tensor | None,
    beta: float = 0.1,
    loss_type: str = "sigmoid",
    label_smoothing: float = 0.0,
    chosen_lengths: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-pair losses and the implicit rewards (beta * log-ratio, detached) of chosen and rejected.

    All inputs are per-sequence log-probs of shape (B,). Without a reference (naive_margin,
    sft_chosen) the rewards are beta * log pi_theta.
    """
    if loss_type not in LOSS_TYPES:
        raise ValueError(f"algo.loss_type={loss_type!r}: must be one of {list(LOSS_TYPES)}")
    ref_chosen = torch.zeros_like(policy_chosen) if ref_chosen is None else ref_chosen
    ref_rejected = torch.zeros_like(policy_rejected) if ref_rejected is None else ref_rejected
    chosen_ratio = policy_chosen - ref_chosen  # log pi_theta(y_w|x) / pi_ref(y_w|x)
    rejected_ratio = policy_rejected - ref_rejected
    h = chosen_ratio - rejected_ratio

    if loss_type == "sigmoid":
        losses = -(1 - label_smoothing) * F.logsigmoid(beta * h) - label_smoothing * F.logsigmoid(-beta * h)
    elif loss_type == "ipo":
        losses = (h - 1 / (2 * beta)) ** 2
    elif loss_type == "hinge":
        losses = torch.relu(1 - beta * h)
    elif loss_type == "naive_margin":
        losses = -(policy_chosen - policy_rejected)
    else:  # sft_chosen
        n = chosen_lengths if chosen_lengths is not None else torch.ones_like(policy_chosen)
        losses = -policy_chosen / n

    return losses, (beta * chosen_ratio).detach(), (beta * rejected_ratio).detach()


def sequence_logps(model, input_ids, attention_mask, labels) -> tuple[torch.Tensor, torch.Tensor]:
    """Sum of completion-token log-probs per row, and the number of completion tokens (each row encoded whole)."""
    logps, mask, _ = labelled_logps(model, input_ids, labels, attention_mask)
    return logps.sum(-1), mask.sum(-1)


def pair_logps(model, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """`sequence_logps` of the 2B stacked rows (chosen, then rejected), with each prompt encoded once
    and its keys/values shared by its two completions (the same values; fewer tokens). A packed batch
    (`data.packing=true`) holds each pair as one padding-free prompt tree instead."""
    b = batch["prompt_input_ids"].size(0)
    if "logp_index" in batch:
        return packed_completion_logps(model, batch, 2 * b)
    ids, mask = batch["completion_ids"], batch["completion_mask"]
    order = torch.arange(2 * b, device=ids.device).view(2, b).T.reshape(-1)  # c_0, r_0, c_1, r_1, ...
    logp, _ = completion_logps(model, batch["prompt_input_ids"], batch["prompt_attention_mask"], ids[order],
                               mask[order], group=2, with_entropy=False)
    return logp.sum(-1)[torch.argsort(order)], mask.sum(-1)  # back to chosen rows, then rejected rows


class DPOModule(LMModule):
    DASHBOARD = [  # the W&B workspace's sections (sweeps/dashboard.py)
        ("Implicit rewards", [
            ("line", "rewards r = beta log pi/pi_ref (train)", STEP, ["train/rewards/chosen", "train/rewards/rejected"]),
            ("line", "reward margin r_w - r_l (train, val)", STEP, ["train/rewards/margins", "val/rewards/margins"]),
            ("line", "preference accuracy P(r_w > r_l)", STEP, ["train/rewards/accuracies", "val/rewards/accuracies"]),
            ("line", "margins, per held-out pair (histogram)", STEP, ["val/rewards/margins_hist"]),
        ]),
        ("Likelihoods", [
            ("line", "log pi(y_w), log pi(y_l)", STEP, ["train/logps/chosen", "train/logps/rejected"]),
            ("line", "DPO loss", STEP, ["train/loss", "val/loss"]),
        ]),
        EVAL_PANELS,
    ]

    DATA_KIND = "preference"

    def __init__(
        self,
        net: PreTrainedModel | str | Callable[..., PreTrainedModel],
        tokenizer=None,
        *,
        beta: float = 0.5,
        loss_type: str = "sigmoid",
        label_smoothing: float = 0.0,
        ref_pretrained: str | None = None,
        cache_ref_logps: bool = True,
        lr: float = 5e-5,
        weight_decay: float = 0.0,
        betas: tuple[float, float] = (0.9, 0.95),
        warmup_steps: int = 10,
        min_lr_ratio: float = 0.1,
        max_new_tokens: int = 8,
        num_logged_samples: int = 8,
        lora: dict | None = None,
        gradient_checkpointing: bool = False,
    ):
        """DPO (or `loss_type`'s variant) of `net` on preference pairs (`DATA_KIND` preference), against a frozen
        reference. The defaults are conf/algo/dpo.yaml's (beta 0.5 and lr 5e-5 on the embedded default; TRL's beta is
        0.1).

        Args:
            beta: the KL strength (the implicit reward is beta log pi/pi_ref).
            loss_type: sigmoid (DPO) | ipo | hinge | naive_margin | sft_chosen (the table above).
            label_smoothing: conservative DPO's eps, in [0, 0.5).
            ref_pretrained: a local checkpoint as the reference; None: a frozen copy of the initial policy.
            cache_ref_logps: compute log pi_ref once per example (keyed by the batch's `index`) while the
                reference does not change.
            The rest: `LMModule`'s."""
        super().__init__(net, tokenizer, lr=lr, weight_decay=weight_decay, betas=betas, warmup_steps=warmup_steps,
                         min_lr_ratio=min_lr_ratio, max_new_tokens=max_new_tokens,
                         num_logged_samples=num_logged_samples, lora=lora, gradient_checkpointing=gradient_checkpointing)
        if loss_type not in LOSS_TYPES:
            raise ValueError(f"algo.loss_type={loss_type!r}: must be one of {list(LOSS_TYPES)}")
        if beta <= 0:
            raise ValueError(f"algo.beta={beta}: must be > 0")
        if not 0 <= label_smoothing < 0.5:
            raise ValueError(f"algo.label_smoothing={label_smoothing}: must be in [0, 0.5)")
        if loss_type in NEEDS_REF:
            self.init_reference(ref_pretrained)
        # pair-weighted means over the val / test split, summed across processes; one set per stage
        for stage in ("val", "test"):
            setattr(self, f"{stage}_stats", torch.nn.ModuleDict({k.replace("/", "_"): MeanMetric() for k in STATS + ("loss",)}))
        self._margins: list[torch.Tensor] = []  # per-pair reward margins of this evaluation, for the histogram

    # ------------------------------------------------------------------ reference
    def reference_logps(self, batch: dict, split: str) -> tuple[torch.Tensor, torch.Tensor]:
        """log pi_ref of chosen and rejected; cached per example while the reference is unchanged."""
        keys = [(split, int(i)) for i in batch["index"]]
        def compute():
            with self.reference() as ref:
                return pair_logps(ref, batch)[0].chunk(2)

        return self.cached_reference(keys, compute, enabled=self.hparams.cache_ref_logps)

    # ------------------------------------------------------------------ steps
    def forward(self, batch: dict, split: str) -> tuple[torch.Tensor, dict]:
        # chosen and rejected rows are stacked (2B rows): one policy forward pass for both, each
        # prompt encoded once for its two completions
        logps, lengths = pair_logps(self.model, batch)
        pc, pr = logps.chunk(2)
        rc, rr = self.reference_logps(batch, split) if self.has_reference else (None, None)
        hp = self.hparams
        losses, r_w, r_l = dpo_loss(pc, pr, rc, rr, hp.beta, hp.loss_type, hp.label_smoothing, lengths.chunk(2)[0])
        stats = {
            "rewards/chosen": r_w,
            "rewards/rejected": r_l,
            "rewards/accuracies": (r_w > r_l).float(),
            "rewards/margins": r_w - r_l,
            "logps/chosen": pc.detach(),
            "logps/rejected": pr.detach(),
        }
        return losses.mean(), stats

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        loss, stats = self(batch, "train")
        n = batch["index"].numel()
        self.log("train/loss", loss, prog_bar=True, batch_size=n)
        for k, v in stats.items():
            self.log(f"train/{k}", v.mean(), prog_bar=k == "rewards/accuracies", batch_size=n)
        return loss

    def _eval_step(self, batch: dict, batch_idx: int, stage: str) -> None:
        loss, stats = self(batch, stage)
        n = batch["index"].numel()
        stats["loss"] = loss.expand(n)
        for k, v in stats.items():
            metric = getattr(self, f"{stage}_stats")[k.replace("/", "_")]
            metric.update(v)
            self.log(f"{stage}/{k}", metric, on_epoch=True, prog_bar=k == "rewards/accuracies", batch_size=n)
        self._margins.append(stats["rewards/margins"].detach())
        self.eval_generation(batch, stage, batch_idx)

    def _margins_histogram(self, stage: str) -> None:
        if self._margins:
            self.log_histogram(f"{stage}/rewards/margins_hist", torch.cat(self._margins))
        self._margins = []

    def on_validation_epoch_end(self) -> None:
        self._margins_histogram("val")
        super().on_validation_epoch_end()

    def on_test_epoch_end(self) -> None:
        self._margins_histogram("test")
        super().on_test_epoch_end()
