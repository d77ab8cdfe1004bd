"""Test-time compute for any LM checkpoint (the lecture's first answer to "how can we make a model better at solving
problems": spend more compute while answering). `eval.py eval.num_samples=n` samples n completions per prompt
(temperature `eval.temperature`) and reports, for k = 1 .. n:

    pass@k       1 - C(n - c, k) / C(n, k), c of the n samples correct (unbiased; Chen et al. 2021)
    majority@k   the most frequent extracted answer among the first k samples is correct (self-consistency)
    best_of@k    the first k samples' best by a scorer is correct: `logprob` (the sample's mean log-prob under the
                 sampler: the model's own confidence, no oracle) or `verifier` (an oracle: = any of k correct)

Correctness is `genlight.rewards.passes`, the definition RLVR's val/pass@k uses: the verifier's score (`eval.verifier`;
null: the checkpoint's own verifier, RLVR's `reward`, else exact match) against each prompt's reference answer reaches
the checkpoint's `algo.pass_threshold` (1.0 without one), and a completion cut at max_new_tokens fails unless the
checkpoint's `algo.truncated_reward` is null.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torchmetrics import Metric

from genlight.metrics import majority_correct, pass_at_k
from genlight.models.rollout import HFRollout
from genlight.rewards import ExactAnswer, passes, score

SCORERS = ("logprob", "verifier", "reward_model")


class CurvesAtK(Metric):
    """Mean over prompts of pass@k, majority@k and best_of@k for k = 1 .. n, from n samples per prompt (their
    correctness, extracted answers and scores, in sampling order); summed across processes."""

    full_state_update = False

    def __init__(self, n: int, **kwargs):
        super().__init__(**kwargs)
        self.n = n
        for name in ("pass_sum", "majority_sum", "best_sum"):
            self.add_state(name, default=torch.zeros(n, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("prompts", default=torch.tensor(0), dist_reduce_fx="sum")

    def update(self, correct: list[list[bool]], answers: list[list[str | None]], scores: list[list[float]]) -> None:
        for c, a, s in zip(correct, answers, scores, strict=True):
            if len(c) != self.n:
                raise ValueError(f"{len(c)} samples for a prompt, expected eval.num_samples={self.n}")
            ks = range(1, self.n + 1)
            self.pass_sum += torch.tensor([pass_at_k(self.n, sum(c), k) for k in ks], dtype=torch.float64)
            self.majority_sum += torch.tensor([float(majority_correct(a[:k], c[:k])) for k in ks], dtype=torch.float64)
            best = [max(range(k), key=lambda i: s[i]) for k in ks]  # the first maximal sample
            self.best_sum += torch.tensor([float(c[b]) for b in best], dtype=torch.float64)
            self.prompts += 1

    def compute(self) -> dict[str, list[float]]:
        n = self.prompts.clamp(min=1)
        return {name: (getattr(self, f"{name}_sum") / n).tolist() for name in ("pass", "majority", "best")}


@torch.no_grad()
def curves_at_k(module, dataloader, n: int, temperature: float, verifier=None, scorer: str = "logprob",
                     max_new_tokens: int | None = None, max_batch_size: int | None = 256, seed: int = 0,
                     reward_model=None) -> dict:
    """Sample n completions per prompt of `dataloader` from `module`'s policy and return
    {"pass": [...], "majority": [...], "best": [...]} (index k - 1), each the mean over prompts; correct by `passes`
    with `verifier` (None: the module's own, else exact match) and the module's pass_threshold and truncation rule
    (the module docstring). Best-of-k picks by
    `scorer`: the sample's mean log-prob, the verifier (an oracle), or `reward_model`'s score (a `RewardModel`)."""
    if n < 1:
        raise ValueError(f"eval.num_samples={n}: must be >= 1")
    if temperature <= 0:
        raise ValueError(f"eval.temperature={temperature}: must be > 0 (sampling)")
    if scorer not in SCORERS:
        raise ValueError(f"eval.scorer={scorer!r}: must be one of {list(SCORERS)}")
    if scorer == "reward_model" and reward_model is None:
        raise ValueError("eval.scorer=reward_model needs eval.reward_model=<a reward model directory> "
                         "(algo=reward_model's hf/ export)")
    hp = getattr(module, "hparams", {})
    threshold, truncated_fails = hp.get("pass_threshold", 1.0), hp.get("truncated_reward", 0.0) is not None
    verifier = verifier or getattr(module, "verifier", None) or ExactAnswer()
    tok = module.tokenizer
    engine = HFRollout(module.model, tok.eos_token_id, tok.pad_token_id, max_batch_size)
    generator = torch.Generator(device=module.device).manual_seed(seed)
    curves = CurvesAtK(n)
    module.eval()
    for batch in dataloader:
        ids, mask = batch["prompt_input_ids"].to(module.device), batch["prompt_attention_mask"].to(module.device)
        roll = engine.generate(ids, mask, n, max_new_tokens or module.hparams.max_new_tokens, temperature, 1.0,
                               generator)
        texts = tok.batch_decode(roll.completion_ids, skip_special_tokens=True)
        prompts, refs = batch["prompts"], batch["references"]
        rewards, _ = score(verifier, [p for p in prompts for _ in range(n)], texts, [r for r in refs for _ in range(n)])
        ok = passes(torch.tensor(rewards), roll.truncated.cpu(), threshold, truncated_fails).tolist()
        correct = [ok[i * n : (i + 1) * n] for i in range(len(prompts))]
        extract = getattr(verifier, "extract", None)
        answers = [extract(t) if extract else t.strip() for t in texts]
        if scorer == "logprob":  # the sample's mean log-prob under the sampler (no oracle)
            s = (roll.logps.sum(-1) / roll.lengths.clamp(min=1)).tolist()
        elif scorer == "reward_model":  # r_phi(prompt, completion), the RLHF reward
            s = reward_model.raw_scores([p for p in prompts for _ in range(n)], texts).tolist()
        else:
            s = rewards
        curves.update(correct, [answers[i * n : (i + 1) * n] for i in range(len(prompts))],
                      [s[i * n : (i + 1) * n] for i in range(len(prompts))])
    return curves.compute()


def plot_curves(curves: dict, title: str, path: Path):
    """pass@k, majority@k and best_of@k against k (log2 axis), saved as a PNG; returns the figure."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ks = list(range(1, len(curves["pass"]) + 1))
    fig, ax = plt.subplots(figsize=(5, 3.5))
    for name, label in (("pass", "pass@k"), ("majority", "majority@k"), ("best", "best-of-k")):
        ax.plot(ks, curves[name], marker="o", ms=3, label=label)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("k (samples per prompt)")
    ax.set_ylabel("fraction of prompts solved")
    ax.set_ylim(0, 1)
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    return fig
