"""The task metrics (src/metrics.py) and the SFT val/loss weighting, each against a computation that shares none of
their code: the energy distance against the formula over scipy's pairwise distances and scipy's own 1-D energy
distance, the Frechet distance against the sqrtm formula over the digits classifier's features, exact match on hand
cases, SFT's token-weighted val/loss against a direct forward over each row, and val/exact_match under DDP (2
processes) against the count of correct rows over both ranks."""

from __future__ import annotations

import warnings

import lightning as L
import numpy as np
import pytest
import torch

from tests.conftest import write_jsonl
from tests.helpers import train_with


# ------------------------------------------------------------------------------------------- energy distance
def _energy_by_hand(x: np.ndarray, y: np.ndarray) -> float:
    """2 E|X - Y| - E|X - X'| - E|Y - Y'|, each expectation the mean over all ordered pairs of the samples, the
    pairs of a point with itself (distance 0) included: the V-statistic the docstring names."""
    from scipy.spatial.distance import cdist

    return 2 * cdist(x, y).mean() - cdist(x, x).mean() - cdist(y, y).mean()


def _energy(x: torch.Tensor, y: torch.Tensor, chunks: int = 1) -> float:
    from genlight.metrics import EnergyDistance

    e = EnergyDistance()
    for part in torch.tensor_split(x, chunks):
        e.update(part, real=True)
    for part in torch.tensor_split(y, chunks):
        e.update(part, real=False)
    return e.compute().item()


def test_energy_distance_equals_the_formula_over_scipy_pairwise_distances():
    """Two fixed 2-D clouds of different sizes (the real and generated counts differ), given in several updates: the
    V-statistic of the formula, computed with scipy's cdist in float64 (a factor of 2 gives 0.469 for 0.235, the
    U-statistic, pairs of a point with itself left out, 0.100)."""
    rng = np.random.default_rng(0)
    x = rng.normal(size=(37, 2))
    y = rng.normal(loc=(0.7, -0.3), scale=(1.5, 0.8), size=(23, 2))
    want = _energy_by_hand(x, y)
    got = _energy(torch.tensor(x), torch.tensor(y), chunks=3)
    assert got == pytest.approx(want, rel=1e-9)  # torch.cdist computes through a matrix product
    # images are flattened: a (N, 1, 2, 2) batch scores as its (N, 4) points
    xi, yi = rng.normal(size=(9, 1, 2, 2)), rng.normal(size=(7, 1, 2, 2)) + 0.5
    assert _energy(torch.tensor(xi), torch.tensor(yi)) == pytest.approx(
        _energy_by_hand(xi.reshape(9, -1), yi.reshape(7, -1)), rel=1e-12)


def test_energy_distance_in_one_dimension_is_scipys_squared():
    """scipy.stats.energy_distance (its own code: the L2 distance between the two empirical CDFs) is the square root
    of the same V-statistic in 1-D: D^2 = 2 E|X-Y| - E|X-X'| - E|Y-Y'| = 2 int (F - G)^2."""
    from scipy.stats import energy_distance

    rng = np.random.default_rng(1)
    x, y = rng.normal(size=50), rng.exponential(size=31)
    got = _energy(torch.tensor(x)[:, None], torch.tensor(y)[:, None])
    assert got == pytest.approx(energy_distance(x, y) ** 2, rel=1e-10)


# ------------------------------------------------------------------------------------------- Frechet distance
def _frechet_by_hand(a: np.ndarray, b: np.ndarray) -> float:
    """||mu_a - mu_b||^2 + Tr(S_a + S_b - 2 sqrtm(S_a S_b)), the covariances unbiased (n - 1), in float64. Features
    that are 0 in every row of both sets (ReLU units that never fire) add nothing to any term and are left out, so
    that sqrtm sees a nonsingular product."""
    from scipy.linalg import sqrtm

    live = (a != 0).any(0) | (b != 0).any(0)
    a, b = a[:, live], b[:, live]
    mu_a, mu_b = a.mean(0), b.mean(0)
    s_a, s_b = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    root = sqrtm(s_a @ s_b).real
    return float(((mu_a - mu_b) ** 2).sum() + np.trace(s_a + s_b - 2 * root))


@pytest.mark.parametrize("fake", ["train_digits", "noise"])
def test_digits_fd_equals_the_sqrtm_formula_on_the_classifiers_features(fake):
    """`sample_metric("fd")` (torchmetrics' FID over the digits classifier) on fixed images equals the Frechet distance
    computed with scipy's sqrtm on the features of the classifier's weights, loaded here on their own: for held-out
    digits against train digits (a small distance) and against uniform noise (a large one)."""
    from genlight.datamodules.images import digits_split
    from genlight.metrics import sample_metric
    from genlight.models.digits_classifier import WEIGHTS, DigitsClassifier

    d = digits_split()
    real = d["val"]
    other = d["train"][:400] if fake == "train_digits" else \
        torch.rand(400, 1, 8, 8, generator=torch.Generator().manual_seed(0)) * 2 - 1
    fd = sample_metric("fd", (1, 8, 8))
    fd.update(real, real=True)
    fd.update(other, real=False)
    got = fd.compute().item()
    clf = DigitsClassifier()
    clf.load_state_dict(torch.load(WEIGHTS, map_location="cpu", weights_only=True))
    with torch.no_grad():
        a, b = (clf.eval().features(v).double().numpy() for v in (real, other))
    want = _frechet_by_hand(a, b)
    assert got == pytest.approx(want, rel=1e-6), (got, want)  # torchmetrics returns float32


# ------------------------------------------------------------------------------------------- exact match
@pytest.mark.parametrize("pred, target, same", [
    ("42", "42", True),
    (" 42\n", "42", True),        # surrounding whitespace is stripped from both sides
    ("42", "\t42 ", True),
    ("", "  ", True),
    ("4 2", "42", False),         # inner whitespace is kept
    ("042", "42", False),         # no numeric normalisation
    ("42.0", "42", False),
    ("Yes", "yes", False),        # case is kept
    ("42 is it", "42", False),    # no prefix match
])
def test_exact_match_strips_surrounding_whitespace_only(pred, target, same):
    from genlight.metrics import ExactMatch

    assert ExactMatch.match(pred, target) is same
    m = ExactMatch()
    m.update([pred], [target])
    assert m.compute().item() == float(same)


def test_exact_match_is_correct_over_total_across_updates():
    """Counts accumulate over updates (3 of 7 right in two batches: 3/7, not the mean of the batch rates 0.5 and
    1/5); an empty metric is 0; predictions and references of different lengths are refused."""
    from genlight.metrics import ExactMatch

    m = ExactMatch()
    with warnings.catch_warnings():  # torchmetrics warns that compute comes before any update: here on purpose
        warnings.simplefilter("ignore")
        assert m.compute().item() == 0.0
    m.update(["1", "2"], ["1", "3"])
    m.update(["5", "6 ", "7", "8", "9"], ["5", "6", "0", "0", "0"])
    assert (int(m.correct), int(m.total)) == (3, 7)
    assert m.compute().item() == pytest.approx(3 / 7)
    with pytest.raises(ValueError, match="ExactMatch: 2 predictions for 1 references"):
        m.update(["1", "2"], ["1"])


# ------------------------------------------------------------------------------------------- SFT val/loss
def test_sft_val_loss_is_token_weighted_over_the_split(tmp_path):
    """val/loss is the sum of every completion token's negative log-likelihood over the split divided by the number
    of completion tokens, whatever the batches: three batches of 2, 2 and 1 rows with 2-token, 12-token and 7-token
    completions; the expected value from a separate unpadded forward pass and log_softmax per row. The mean of the
    batches' means (an unweighted mean) differs by far more than the tolerance."""
    from genlight.datamodules.files import FileSource
    from genlight.datamodules.lm import LMDataModule
    from genlight.lightning_modules.sft import SFTModule
    from genlight.models import char_tokenizer, tiny_llama

    rows = [{"prompt": "1+0=", "completion": "1"}, {"prompt": "2+0=", "completion": "2"},
            {"prompt": "3+4=", "completion": "seven again"}, {"prompt": "4+4=", "completion": "eight again"},
            {"prompt": "5+5=", "completion": "ten ten"}]
    path = write_jsonl(tmp_path / "val.jsonl", rows)
    tok = char_tokenizer()
    net = tiny_llama(tok, hidden_size=32, num_layers=1, num_heads=2, intermediate_size=64, seed=3)
    module = SFTModule(net=net, tokenizer=tok, max_new_tokens=2)
    dm = LMDataModule(FileSource(train=str(path), val=str(path)), tok, kind="sft", batch_size=2, eval_batch_size=2)
    trainer = L.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False)
    got = trainer.validate(module, datamodule=dm, verbose=False)[0]["val/loss"]

    nll, counts = [], []
    with torch.no_grad():
        for e in dm.examples["val"]:
            p, c = e["prompt_ids"], e["completion_ids"]
            logp = torch.log_softmax(net(torch.tensor([p + c])).logits[0].double(), -1)
            nll.append(-sum(logp[len(p) - 1 + i, t].item() for i, t in enumerate(c)))
            counts.append(len(c))
    assert counts == [2, 2, 12, 12, 8]  # the completion and its EOS
    want = sum(nll) / sum(counts)
    assert got == pytest.approx(want, rel=1e-5)
    batch_means = [sum(nll[i:i + 2]) / sum(counts[i:i + 2]) for i in (0, 2, 4)]
    assert abs(np.mean(batch_means) - want) > 100 * 1e-5 * want


# ------------------------------------------------------------------------------------------- exact match under DDP
# rows of the 16-row val split that the stand-in generator answers correctly: under DDP's interleaved val sampler
# three fall to one rank and one to the other
CORRECT_ROWS = {0, 2, 4, 7}


class ScriptedAnswers(L.Callback):
    """Greedy generation replaced by a script: the reference for the rows in CORRECT_ROWS, a wrong answer for the
    others; each rank's own count of correct answers is logged per rank before the metric sums them."""

    def setup(self, trainer, pl_module, stage):
        def generate(input_ids, attention_mask, **kwargs):
            batch = self.batch
            return [ref if int(i) in CORRECT_ROWS else ref + "x" for i, ref in zip(batch["index"], batch["references"])]

        pl_module.generate = generate

    def on_validation_batch_start(self, trainer, pl_module, batch, batch_idx, dataloader_idx=0):
        self.batch = batch

    def on_validation_epoch_end(self, trainer, pl_module):
        if trainer.sanity_checking:
            return
        m = pl_module.val_exact_match
        per_rank = pl_module.all_gather(torch.stack([m.correct, m.total]))  # (world, 2): each rank's own counts
        for r in range(per_rank.size(0)):
            pl_module.log(f"ddp/correct_rank{r}", per_rank[r, 0].float(), batch_size=1)
            pl_module.log(f"ddp/total_rank{r}", per_rank[r, 1].float(), batch_size=1)


def test_val_exact_match_under_ddp_is_total_correct_over_total(cfg_factory):
    """2 processes (gloo, ddp_fork), each validating its half of the 16 val rows, with different numbers of correct
    answers (3 and 1): val/exact_match is (3 + 1) / 16 exactly. A reduction of the correct counts other than the
    sum (max: 3/16, mean: 2/16) or of the totals (max: 4/8) gives another value."""
    cfg = cfg_factory("algo=sft", "trainer=ddp", "trainer.strategy=ddp_fork", "trainer.max_steps=2",
                      "trainer.val_check_interval=2", "data.batch_size=8", "data.eval_batch_size=4", "test=false",
                      "callbacks=none")
    metrics, _ = train_with(cfg, ScriptedAnswers())
    correct = sorted(int(metrics[f"ddp/correct_rank{r}"]) for r in (0, 1))
    totals = [int(metrics[f"ddp/total_rank{r}"]) for r in (0, 1)]
    assert correct == [1, 3] and totals == [8, 8], (correct, totals)  # the ranks differ: the check is not vacuous
    assert float(metrics["val/exact_match"]) == pytest.approx(4 / 16, abs=1e-7)
