"""Kahneman-Tversky Optimization (Ethayarajh et al. 2024, "KTO: Model Alignment as Prospect Theoretic Optimization"),
as TRL's `KTOTrainer` (1.16) states it: alignment from unpaired binary feedback, each row a prompt, a completion and a
label (desirable or undesirable), no pairs needed.

    r(x, y)  = log pi_theta(y|x) - log pi_ref(y|x)                         (the implied reward is beta r)
    z_0      = max(0, mean_i [log pi_theta(y'_i|x_i) - log pi_ref(y'_i|x_i)]),  detached, y'_i = y_{i-k}
               (each prompt with another row's completion, k = 1 unless that is the same prompt's: mismatched
               pairs, a batch estimate of KL[pi_theta || pi_ref], the reference point of prospect theory;
               averaged over processes)
    L(x, y)  = lambda_D (1 - sigma(beta (r(x, y) - z_0)))   y desirable     (the paper's eq. 7: lambda_y - v(x, y))
               lambda_U (1 - sigma(beta (z_0 - r(x, y))))   y undesirable
    L_KTO    = the mean of L over the batch's rows

lambda_D / lambda_U (`desirable_weight`, `undesirable_weight`) balance the two kinds; the paper keeps
lambda_D n_D / (lambda_U n_U) in [1, 4/3]. Log-probabilities are sums over completion tokens.

Rows (`UNPAIRED`, named by `data.kind` in conf/algo/kto.yaml): TRL's unpaired preference format {"prompt",
"completion", "label"} (plain or chat), from JSONL or a `datasets` directory; a task that makes preference pairs
(the arithmetic task: the correct answer and a corrupted one) gives each pair as a desirable and an undesirable row.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import torch
from torchmetrics import MeanMetric, SumMetric
from torchmetrics.classification import BinaryAUROC
from transformers import PreTrainedModel

from genlight.callbacks.wandb_axes import STEP
from genlight.datamodules.files import DataError
from genlight.datamodules.lm import (
    RowKind,
    Tokenized,
    collate_sft,
    pad,
    render_completion,
    render_prompt,
    require_keys,
    sft_example,
)
from genlight.lightning_modules.lm import EVAL_PANELS, LMModule
from genlight.models.logps import completion_logps

log = logging.getLogger(__name__)
UNPAIRED_FORMATS = '{"prompt", "completion", "label"}'
STATS = ("rewards/chosen", "rewards/rejected", "logps/chosen", "logps/rejected")
# the held-out metrics a split must have these labels for (True = desirable rows); on a split without them they are
# undefined (a mean over no rows is NaN; torchmetrics' AUROC of one class is 0.0) and not logged
NEEDS_LABELS = {"rewards/chosen": {True}, "logps/chosen": {True}, "rewards/rejected": {False},
                "logps/rejected": {False}, "rewards/margins": {True, False}, "rewards/auroc": {True, False},
                "exact_match": {True}}


# --------------------------------------------------------------------------- the loss
def kl_reference_point(kl_policy_logps: torch.Tensor, kl_ref_logps: torch.Tensor) -> torch.Tensor:
    """z_0 of this process's mismatched pairs: the mean of log pi_theta - log pi_ref, detached (clamped at 0 after the
    mean over processes: `KTOModule.reference_point`)."""
    return (kl_policy_logps - kl_ref_logps).mean().detach()


def kto_loss(policy_logps: torch.Tensor, ref_logps: torch.Tensor, labels: torch.Tensor, z0: torch.Tensor | float,
             beta: float = 0.1, desirable_weight: float = 1.0,
             undesirable_weight: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row losses lambda_y (1 - sigma(+-beta (r - z_0))) and implied rewards beta r (detached), all (B,);
    `labels` True for desirable rows."""
    r = policy_logps - ref_logps
    desirable = desirable_weight * (1 - torch.sigmoid(beta * (r - z0)))
    undesirable = undesirable_weight * (1 - torch.sigmoid(beta * (z0 - r)))
    return torch.where(labels, desirable, undesirable), (beta * r).detach()


# --------------------------------------------------------------------------- the rows
def unpaired_example(row: dict, t: Tokenized, where: str) -> dict:
    """A row {"prompt", "completion", "label"}: prompt ids, completion ids, the label, and a reference for greedy exact
    match (the row's `answer`, else the completion; exact match counts desirable rows only)."""
    label = check_label(row, where)
    require_keys(row, ("prompt", "completion", "label"), where, UNPAIRED_FORMATS)
    prompt, templated = render_prompt(row["prompt"], t.tok, where, "prompt")
    completion = render_completion(row["completion"], where, "completion")
    p = t.prompt(prompt, templated)
    reference = row.get("answer", completion)
    return {"prompt": prompt, "prompt_ids": p, "completion_ids": t.fit(p, t.completion(completion), where),
            "label": label, "reference": str(reference)}


def check_label(row: dict, where: str) -> bool:
    """The row's label, after refusing a preference pair (not KTO's format) and a label that is not a boolean."""
    if "completion" not in row and ("chosen" in row or "rejected" in row):
        raise DataError(f"{where}: a preference pair ({{chosen, rejected}}): algo=kto reads unpaired rows "
                        f"{UNPAIRED_FORMATS}; write each pair as a desirable and an undesirable row, or use algo=dpo")
    label = row.get("label")
    if not isinstance(label, bool):
        raise DataError(f"{where}: 'label' must be true (desirable) or false (undesirable), got {label!r}")
    return label


def unpaired_rows(source, split: str, seed: int) -> list[tuple[str, dict]]:
    """A split's unpaired rows: a file's own, or each of a task's preference pairs as a desirable and an undesirable
    row (the pair's answer kept for exact match). KTO needs both kinds in the train split (and its AUROC in val/test)."""
    if hasattr(source, "preference_rows"):
        rows = []
        for where, pair in source.preference_rows(split, seed=seed):
            common = {"prompt": pair["prompt"]} | ({"answer": pair["answer"]} if "answer" in pair else {})
            rows += [(where, {**common, "completion": pair["chosen"], "label": True}),
                     (where, {**common, "completion": pair["rejected"], "label": False})]
        return rows
    rows = source.rows(split)
    labels = {check_label(row, where) for where, row in rows}
    if len(labels) == 1:
        kind = "desirable (label true)" if labels.pop() else "undesirable (label false)"
        origin = rows[0][0].rsplit(":", 1)[0].split("[row", 1)[0]
        if split == "train":
            raise DataError(f"{origin}: every row of the train split is {kind}: KTO learns from both desirable and "
                            "undesirable completions (its reference point weighs one against the other); add rows of "
                            "the other label")
        # val / test: their metrics that need both labels are not logged (`KTOModule`, which says so once), and an
        # `optimized_metric` among them is refused before any work (`KTOModule.check_config`)
    return rows


def mismatch_shift(prompts: list[list[int]]) -> int:
    """The smallest cyclic shift k >= 1 that pairs no row's prompt with a completion of the same prompt (1 when every
    row has one prompt). TRL cycles by one, which on a task's rows (a prompt's desirable and undesirable completions
    side by side, as in an unshuffled val split) would pair half the rows with their own prompt's completion and bias
    z_0 upward."""
    n = len(prompts)
    for k in range(1, n):
        if all(prompts[i] != prompts[i - k] for i in range(n)):
            return k
    return 1


def collate_unpaired(examples: list[dict], prompts: list[list[int]], c) -> dict:
    """The completions (right-padded), their labels, and the mismatched completions for z_0: row i's prompt with row
    i - k's completion (TRL cycles the batch's completions by k = 1; here the smallest k that mismatches every row,
    `mismatch_shift`)."""
    completions = [e["completion_ids"] for e in examples]
    k = mismatch_shift(prompts) % max(len(completions), 1)
    mismatched = completions[-k:] + completions[:-k] if k else completions
    return {"completion_ids": pad(completions, c.pad_id), "completion_mask": pad([[1] * len(x) for x in completions], 0),
            "kl_completion_ids": pad(mismatched, c.pad_id),
            "kl_completion_mask": pad([[1] * len(x) for x in mismatched], 0),
            "labels": torch.tensor([e["label"] for e in examples])}


def desirable_rows(source, split: str, seed: int) -> list[tuple[str, dict]]:
    """The desirable rows only (KTO's warm start: SFT must never imitate an undesirable completion)."""
    rows = unpaired_rows(source, split, seed) if not hasattr(source, "preference_rows") else source.rows(split)
    kept = [(w, r) for w, r in rows if r.get("label", True) is True]
    if len(kept) < len(rows):
        log.info("%s split: the warm start trains on the %d desirable of %d rows", split, len(kept), len(rows))
    return kept


UNPAIRED = RowKind(unpaired_example, collate_unpaired, rows=unpaired_rows,
                   keys=("completion_ids", "completion_mask", "kl_completion_ids", "kl_completion_mask", "labels"))
DESIRABLE = RowKind(sft_example, collate_sft, packs=True, rows=desirable_rows, keys=("input_ids", "labels"))  # the warm start's (warm_start.kind)


# --------------------------------------------------------------------------- the module
class KTOModule(LMModule):
    DASHBOARD = [  # the W&B workspace's sections (sweeps/dashboard.py)
        ("Implicit rewards", [
            ("line", "rewards beta log pi/pi_ref of desirable and undesirable rows (train)", STEP,
             ["train/rewards/chosen", "train/rewards/rejected"]),
            ("line", "reward margin (train, val)", STEP, ["train/rewards/margins", "val/rewards/margins"]),
            ("line", "P(r_desirable > r_undesirable) over the val split (AUROC)", STEP, ["val/rewards/auroc"]),
            ("line", "reference point z_0 (KL estimate)", STEP, ["train/kl", "val/kl"]),
        ]),
        ("Likelihoods", [
            ("line", "log pi of desirable and undesirable rows", STEP, ["train/logps/chosen", "train/logps/rejected"]),
            ("line", "KTO loss", STEP, ["train/loss", "val/loss"]),
        ]),
        EVAL_PANELS,
    ]

    DATA_KIND = "genlight.lightning_modules.kto.UNPAIRED"

    def __init__(
        self,
        net: PreTrainedModel | str | Callable[..., PreTrainedModel],
        tokenizer=None,
        *,
        beta: float = 0.1,
        desirable_weight: float = 1.0,
        undesirable_weight: float = 1.0,
        ref_pretrained: str | None = None,
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
        """KTO of `net` on unpaired rows (`DATA_KIND`: `UNPAIRED`, {prompt, completion, label}), against a frozen
        reference. The defaults are conf/algo/kto.yaml's.

        Args:
            beta: the implied reward's scale (TRL's default 0.1).
            desirable_weight, undesirable_weight: lambda_D and lambda_U.
            ref_pretrained: a local checkpoint as the reference; None: a frozen copy of the initial policy.
            The rest: `LMModule`'s."""
        super().__init__(net, tokenizer, lr=lr, weight_decay=weight_decay, betas=betas, warmup_steps=warmup_steps,
                         min_lr_ratio=min_lr_ratio, max_new_tokens=max_new_tokens,
                         num_logged_samples=num_logged_samples, lora=lora, gradient_checkpointing=gradient_checkpointing)
        if beta <= 0:
            raise ValueError(f"algo.beta={beta}: must be > 0")
        for key, value in (("desirable_weight", desirable_weight), ("undesirable_weight", undesirable_weight)):
            if value <= 0:
                raise ValueError(f"algo.{key}={value}: must be > 0")
        self.init_reference(ref_pretrained)
        for stage in ("val", "test"):  # row-weighted means over the split, summed across processes; AUROC; row counts
            metrics = {k.replace("/", "_"): MeanMetric() for k in STATS + ("loss", "kl")}
            counts = {"rows_chosen": SumMetric(), "rows_rejected": SumMetric()}
            setattr(self, f"{stage}_stats", torch.nn.ModuleDict(counts | metrics | {"rewards_auroc": BinaryAUROC()}))
        self._one_label_warned: set[str] = set()
        self._has_desirable: dict[str, bool] = {}

    @staticmethod
    def check_config(cfg) -> None:
        """Before any work (train.py calls it first): packing is refused, and so is an `optimized_metric` that the val
        split's labels leave undefined (the AUROC of a split of desirable rows only): no validation would log it, so
        neither the best checkpoint nor a sweep's trials could be ranked by it."""
        if cfg.data.get("packing"):
            raise ValueError("data.packing=true: KTO scores each row and a mismatched completion for its reference "
                             "point in padded rows; set data.packing=false for algo=kto")
        metric = str(cfg.get("optimized_metric") or "")
        needs = NEEDS_LABELS.get(metric.removeprefix("val/")) if metric.startswith("val/") else None
        if not cfg.get("train") or not needs:
            return
        import hydra

        data = hydra.utils.instantiate(cfg.data, tokenizer=hydra.utils.instantiate(cfg.model.tokenizer))
        if not hasattr(data, "rows") or (hasattr(data, "has_split") and not data.has_split("val")):
            return
        rows = data.rows("val")
        labels = {row.get("label") for _, row in rows}
        if rows and not needs <= labels:
            kind = "desirable (label true)" if labels == {True} else "undesirable (label false)"
            origin = rows[0][0].rsplit(":", 1)[0].split("[row", 1)[0]
            other = "val/exact_match, or val/loss with monitor_mode=min" if True in labels else \
                "val/loss with monitor_mode=min"
            raise ValueError(
                f"optimized_metric={metric}: every row of the val split ({origin}, {len(rows)} rows) is {kind}, and "
                f"{metric} needs {'both labels' if len(needs) == 2 else 'rows of the other label'}: it would never "
                "be logged, so neither the best checkpoint nor a sweep could be ranked by it. Add rows of the other "
                f"label to the val split (data.source.val), or set another optimized_metric ({other})")

    # ------------------------------------------------------------------ log-probs
    @staticmethod
    def sequence_logps(model, batch: dict, which: str = "") -> torch.Tensor:
        """Summed log-probs of each row's completion (`which=""`) or of its mismatched one (`which="kl_"`)."""
        logp, _ = completion_logps(model, batch["prompt_input_ids"], batch["prompt_attention_mask"],
                                   batch[f"{which}completion_ids"], batch[f"{which}completion_mask"], with_entropy=False)
        return logp.sum(-1)

    def reference_point(self, batch: dict, ref_kl: torch.Tensor) -> torch.Tensor:
        """z_0 (detached): this process's mismatched-pair estimate, averaged over processes, clamped at 0."""
        with torch.no_grad():
            z = kl_reference_point(self.sequence_logps(self.model, batch, "kl_"), ref_kl)
        if self.trainer.world_size > 1:
            z = self.all_gather(z).mean()
        return z.clamp(min=0)

    # ------------------------------------------------------------------ steps
    def forward(self, batch: dict) -> tuple[torch.Tensor, dict]:
        policy = self.sequence_logps(self.model, batch)
        with torch.no_grad(), self.reference() as ref_model:
            ref, ref_kl = self.sequence_logps(ref_model, batch), self.sequence_logps(ref_model, batch, "kl_")
        z0 = self.reference_point(batch, ref_kl)
        hp = self.hparams
        labels = batch["labels"]
        losses, rewards = kto_loss(policy, ref, labels, z0, hp.beta, hp.desirable_weight, hp.undesirable_weight)
        return losses.mean(), {"rewards": rewards, "logps": policy.detach(), "labels": labels, "kl": z0}

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        loss, out = self(batch)
        labels, n = out["labels"], out["labels"].numel()
        self.log("train/loss", loss, prog_bar=True, batch_size=n)
        self.log("train/kl", out["kl"], batch_size=n)
        means = {}
        for name, mask in (("chosen", labels), ("rejected", ~labels)):
            if mask.any():  # TRL's names: chosen = desirable rows, rejected = undesirable ones
                means[name] = out["rewards"][mask].mean()
                self.log(f"train/rewards/{name}", means[name], batch_size=int(mask.sum()))
                self.log(f"train/logps/{name}", out["logps"][mask].mean(), batch_size=int(mask.sum()))
        if len(means) == 2:
            self.log("train/rewards/margins", means["chosen"] - means["rejected"], batch_size=n)
        return loss

    def _eval_step(self, batch: dict, batch_idx: int, stage: str) -> None:
        loss, out = self(batch)
        labels, n = out["labels"], out["labels"].numel()
        stats = getattr(self, f"{stage}_stats")
        values = {"loss": (loss.detach().expand(n), None), "kl": (out["kl"].expand(n), None),
                  "rewards/chosen": (out["rewards"], labels), "rewards/rejected": (out["rewards"], ~labels),
                  "logps/chosen": (out["logps"], labels), "logps/rejected": (out["logps"], ~labels)}
        for k, (v, mask) in values.items():
            stats[k.replace("/", "_")].update(v if mask is None else v[mask])
        stats["rows_chosen"].update(labels.sum())
        stats["rows_rejected"].update((~labels).sum())
        stats["rewards_auroc"].update(out["rewards"], labels.long())
        # greedy exact match on the desirable rows (against their `answer`, or their completion): a task's prompt,
        # which has a desirable and an undesirable row, counts once; logged at the epoch's end where the split has
        # desirable rows (summed over processes; a split without would log 0.0 over none). Not generated at all when
        # the DataModule's split shows it has none
        if batch_idx == 0:
            self._has_desirable[stage] = self._split_has_desirable(stage)
        if self._has_desirable.get(stage, True):
            self.eval_generation(batch, stage, batch_idx, rows=[i for i, y in enumerate(labels.tolist()) if y],
                                 log=False)

    def _split_has_desirable(self, stage: str) -> bool:
        """Whether the split holds a desirable row (True when the DataModule keeps no `examples` to look at)."""
        examples = getattr(getattr(self.trainer, "datamodule", None), "examples", None) or {}
        return stage not in examples or any(e.get("label", True) for e in examples[stage])

    def _eval_epoch_end(self, stage: str) -> None:
        stats = getattr(self, f"{stage}_stats")
        values, defined = {}, set()
        if stats["rows_chosen"].update_called:
            # the labels of the whole split (summed over processes, so every process computes the same metrics)
            present = {label for label, key in ((True, "rows_chosen"), (False, "rows_rejected"))
                       if stats[key].compute() > 0}
            defined = {k for k, needs in NEEDS_LABELS.items() if needs <= present}
            values = {k: m.compute() for k, m in stats.items() if not k.startswith("rows_")
                      and (k.replace("_", "/", 1) in defined or k in ("loss", "kl"))}
            if "rewards/margins" in defined:
                values["rewards_margins"] = values["rewards_chosen"] - values["rewards_rejected"]
            if len(present) < 2 and stage not in self._one_label_warned and not self.trainer.sanity_checking:
                self._one_label_warned.add(stage)
                log.warning("every row of the %s split is %s: %s are undefined there (a mean over no rows, an AUROC "
                            "of one label) and not logged", stage,
                            "desirable (label true)" if True in present else "undesirable (label false)",
                            ", ".join(f"{stage}/{k}" for k in NEEDS_LABELS if k not in defined))
        exact = getattr(self, f"{stage}_exact_match")
        if "exact_match" in defined and exact.update_called:
            values["exact_match"] = exact.compute()
        exact.reset()
        for m in stats.values():
            m.reset()
        if not self.trainer.sanity_checking:
            for k, v in values.items():
                name = k.replace("rewards_", "rewards/").replace("logps_", "logps/")
                self.log(f"{stage}/{name}", v, prog_bar=name == "rewards/auroc")
        self.log_samples(stage)

    def on_validation_epoch_end(self) -> None:
        self._eval_epoch_end("val")

    def on_test_epoch_end(self) -> None:
        self._eval_epoch_end("test")
