"""Task metrics as torchmetrics Metrics, so they are summed across processes under DDP."""

from __future__ import annotations

import torch
from torchmetrics import Metric


class ExactMatch(Metric):
    """Fraction of generated completions that equal the reference once surrounding whitespace is stripped from both
    (`str.strip`; case, inner spaces and leading zeros count): correct and total are counted, and summed across
    processes, so the value is the whole split's correct / total."""

    full_state_update = False
    higher_is_better = True

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.add_state("correct", default=torch.tensor(0), dist_reduce_fx="sum")
        self.add_state("total", default=torch.tensor(0), dist_reduce_fx="sum")

    @staticmethod
    def match(pred: str, target: str) -> bool:
        return pred.strip() == target.strip()

    def update(self, preds: list[str], targets: list[str]) -> None:
        if len(preds) != len(targets):
            raise ValueError(f"ExactMatch: {len(preds)} predictions for {len(targets)} references")
        self.correct += sum(self.match(p, t) for p, t in zip(preds, targets))
        self.total += len(targets)

    def compute(self) -> torch.Tensor:
        return self.correct.float() / self.total.clamp(min=1)


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k from n samples of which c are correct (Chen et al. 2021, Codex):
    1 - C(n - c, k) / C(n, k), computed as a stable product."""
    if k > n:
        raise ValueError(f"pass@{k} needs at least k={k} samples per prompt, got n={n}")
    if n - c < k:
        return 1.0
    return 1.0 - float(torch.prod(1.0 - k / torch.arange(n - c + 1, n + 1, dtype=torch.float64)))


def majority_correct(answers: list[str | None], correct: list[bool]) -> bool:
    """Majority voting (self-consistency): is the most frequent extracted answer a correct one?
    Ties go to the answer seen first; samples with no extractable answer do not vote."""
    votes: dict[str, int] = {}
    for a in answers:
        if a is not None:
            votes[a] = votes.get(a, 0) + 1
    if not votes:
        return False
    top = max(votes, key=votes.get)  # first maximal key in insertion order
    return any(c for a, c in zip(answers, correct) if a == top)


class PassAtK(Metric):
    """Mean over prompts of pass@k (unbiased, for each k in `ks`) and of majority@n, from n sampled
    completions per prompt; summed across processes."""

    full_state_update = False
    higher_is_better = True

    def __init__(self, ks: list[int], **kwargs):
        super().__init__(**kwargs)
        self.ks = sorted(set(int(k) for k in ks))
        self.add_state("pass_sum", default=torch.zeros(len(self.ks), dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("majority_sum", default=torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("prompts", default=torch.tensor(0), dist_reduce_fx="sum")

    def update(self, correct: list[list[bool]], answers: list[list[str | None]]) -> None:
        for c, a in zip(correct, answers, strict=True):
            n, k_correct = len(c), sum(c)
            self.pass_sum += torch.tensor([pass_at_k(n, k_correct, k) for k in self.ks], dtype=torch.float64)
            self.majority_sum += float(majority_correct(a, c))
            self.prompts += 1

    def compute(self) -> dict[str, torch.Tensor]:
        n = self.prompts.clamp(min=1)
        out = {f"pass@{k}": (self.pass_sum[i] / n).float() for i, k in enumerate(self.ks)}
        out["majority"] = (self.majority_sum / n).float()
        return out


class EnergyDistance(Metric):
    """Energy distance between two point clouds (Szekely & Rizzo): D^2 = 2 E|X - Y| - E|X - X'| - E|Y - Y'|,
    the V-statistic (means over all pairs), which is >= 0; two samples of one distribution score O(1/n).
    Same `update(x, real)` interface as FID."""

    full_state_update = False
    higher_is_better = False
    name = "energy_distance"

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.add_state("real", default=[], dist_reduce_fx="cat")
        self.add_state("fake", default=[], dist_reduce_fx="cat")

    def update(self, x: torch.Tensor, real: bool) -> None:
        (self.real if real else self.fake).append(x.detach().flatten(1).double())

    def compute(self) -> torch.Tensor:
        cat = lambda v: torch.cat(v) if isinstance(v, list) else v  # noqa: E731  (a tensor after DDP sync)
        x, y = cat(self.real), cat(self.fake)
        if len(x) < 2 or len(y) < 2:
            raise RuntimeError("EnergyDistance needs at least 2 real and 2 generated points")
        return 2 * torch.cdist(x, y).mean() - torch.cdist(x, x).mean() - torch.cdist(y, y).mean()


def sample_metric(name: str, shape: tuple[int, ...]) -> Metric | None:
    """The sample-quality metric named by `data.metric` for samples of `shape` (None for 'loss')."""
    if name == "loss":
        return None
    if name == "energy_distance":
        return EnergyDistance()
    if name == "fd":
        from torchmetrics.image.fid import FrechetInceptionDistance

        from genlight.models.digits_classifier import DigitsFeatures

        if tuple(shape) != (1, 8, 8):
            raise ValueError(f"data.metric=fd uses the digits classifier's features and needs 1x8x8 images, "
                             f"not {'x'.join(map(str, shape))}; use data.metric=loss")
        fd = FrechetInceptionDistance(feature=DigitsFeatures(), normalize=True, reset_real_features=True)
        fd.name = "fd"
        return fd
    raise ValueError(f"data.metric={name!r}: must be 'fd', 'energy_distance' or 'loss'")


def class_accuracy(samples: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """The share of 1x8x8 digit samples that the shipped digits classifier assigns to the label asked for."""
    from genlight.models.digits_classifier import DigitsFeatures

    clf = DigitsFeatures().net.to(samples.device)
    return (clf(samples.float()).argmax(-1) == labels).float().mean()
