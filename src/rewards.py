"""Verifiable rewards: r(completion, answer) in [0, 1], chosen with the Hydra group `reward=`.

A verifier reads model output as text and never evaluates it (no `eval`; math_verify parses it into SymPy
expressions, bounded in size and time, never executed). Built-in verifiers never raise: malformed, empty, unicode
or huge outputs score 0.
Each also has `extract(completion)`, the normalised final answer used for majority voting.

    exact    the stripped completion equals the answer
    numeric  the completion is a number within a tolerance of the answer
    math_verify  Hugging Face's `math-verify` (what TRL's accuracy_reward and open-r1 use): the final answer
             (the last \\boxed{...}, else the last expression) and the reference parsed to SymPy and compared
             symbolically (\\frac12 = 0.5, {1,2,3} = {3,2,1}, intervals, x = 2 and 2); `reward=math` is its alias
    reasoning_gym  a reasoning-gym generator's own `score_answer` on its own entry (src/datamodules/reasoning_gym.py)
    custom   any Python callable f(completion, answer) -> float, by `_target_`
    model    a trained reward model r_phi(prompt, completion) (`RewardModel`: algo=reward_model's export), not a
             verifier: scored in batches on the trainer's device, optionally whitened and mixed with a verifier
"""

from __future__ import annotations

import logging
import math
import unicodedata
from collections.abc import Callable
from decimal import Decimal, InvalidOperation
from pathlib import Path

import torch

log = logging.getLogger(__name__)

_MAX_CHARS = 10_000


class RewardError(RuntimeError):
    """A verifier raised; the message names the prompt, the completion and the verifier."""


def _normalise(text: str) -> str:
    """NFKC (full-width digits -> ASCII, ...) and collapsed whitespace."""
    return " ".join(unicodedata.normalize("NFKC", text).split())


def parse_number(text: str) -> Decimal | None:
    """A finite Decimal for a plain number (1,234 / -5 / 2.50 / 1e3), else None."""
    text = _normalise(text).replace(",", "")
    if not text or len(text) > 400:
        return None
    try:
        value = Decimal(text)
    except (InvalidOperation, ValueError):
        return None
    return value if value.is_finite() else None


class Verifier:
    """Base class: subclasses define `extract` (final answer, or None) and `match`."""

    name = "verifier"

    def extract(self, completion: str) -> str | None:
        text = _normalise(completion[:_MAX_CHARS])
        return text or None

    def match(self, prediction: str, answer: str) -> bool:
        return prediction == _normalise(answer)

    def __call__(self, completion: str, answer: str) -> float:
        if not isinstance(completion, str):
            return 0.0
        prediction = self.extract(completion)
        return float(prediction is not None and self.match(prediction, str(answer)))


class ExactAnswer(Verifier):
    """1 if the completion, stripped (and NFKC-normalised), is exactly the answer."""

    name = "exact"


class NumericAnswer(Verifier):
    """1 if the completion is one number within max(abs_tol, rel_tol * |answer|) of the answer."""

    name = "numeric"

    def __init__(self, abs_tol: float = 0.0, rel_tol: float = 0.0):
        if abs_tol < 0 or rel_tol < 0:
            raise ValueError(f"reward.abs_tol={abs_tol}, reward.rel_tol={rel_tol}: must be >= 0")
        self.abs_tol, self.rel_tol = Decimal(str(abs_tol)), Decimal(str(rel_tol))

    def extract(self, completion: str) -> str | None:
        value = parse_number(completion[:_MAX_CHARS])
        return None if value is None else str(value.normalize())

    def match(self, prediction: str, answer: str) -> bool:
        a, p = parse_number(answer), parse_number(prediction)
        if a is None or p is None:
            return False
        return abs(p - a) <= max(self.abs_tol, self.rel_tol * abs(a))


class MathVerify(Verifier):
    """math-verify: `parse` the reference and the completion, `verify` them (SymPy equality; numbers to
    `float_rounding` decimals). A reference that does not parse is an error naming its row (`check_references`,
    before training), never a silent 0. math-verify bounds parse and verify with SIGALRM, which only the main thread
    may use: elsewhere (a thread of a serving engine) they run unbounded, on completions capped at 10,000 characters.
    Worker processes and DDP ranks run verifiers in their own main thread."""

    name = "math_verify"

    def __init__(self, float_rounding: int = 6, numeric_precision: int = 15, strict: bool = True,
                 timeout_seconds: int = 5):
        import math_verify  # noqa: F401  (fail at construction if the dependency is missing)

        self.float_rounding, self.numeric_precision, self.strict = float_rounding, numeric_precision, strict
        self.timeout_seconds = timeout_seconds
        self._gold: dict[str, list] = {}

    def _timeout(self) -> int | None:
        import threading

        return self.timeout_seconds if threading.current_thread() is threading.main_thread() else None

    def _parse(self, text: str) -> list:
        from math_verify import parse

        with _quiet("math_verify"):  # it warns on every call made without a timeout
            return parse(text[:_MAX_CHARS], parsing_timeout=self._timeout())

    def gold(self, answer: str) -> list:
        """The reference parsed (cached): a bare reference as LaTeX between $ (`\\frac12`, `[1,2)`, `(x+1)^2`, `50\\%`),
        else as written (one with its own $ or \\boxed{}, or plain text)."""
        answer = str(answer)
        if answer not in self._gold:
            delimited = "$" in answer or "\\boxed" in answer
            parsed = (not delimited and self._parse(f"${answer}$")) or self._parse(answer)
            # math-verify falls back to the matched text alone when it finds no expression: not an answer
            self._gold[answer] = parsed if any(not isinstance(x, str) for x in parsed) else []
        return self._gold[answer]

    def check_references(self, examples: list[dict], split: str) -> None:
        for e in examples:
            if not self.gold(e["reference"]):
                raise ValueError(f"{e['where']}: reward=math_verify cannot parse "
                                 f"the reference answer {e['reference']!r} (math-verify finds no expression in it); "
                                 "fix the row, or use data.answer_pattern to extract the final answer")

    def extract(self, completion: str) -> str | None:
        parsed = self._parse(completion) if isinstance(completion, str) else []
        return str(parsed[0]) if parsed else None

    def __call__(self, completion: str, answer: str) -> float:
        from math_verify import verify

        if not isinstance(completion, str):
            return 0.0
        gold = self.gold(answer)
        if not gold:
            raise ValueError(f"reference answer {str(answer)!r} does not parse (math-verify)")
        pred = self._parse(completion)
        if not pred:
            return 0.0
        with _quiet("math_verify"):
            return float(verify(gold, pred, float_rounding=self.float_rounding, numeric_precision=self.numeric_precision,
                                strict=self.strict, timeout_seconds=self._timeout()))


class _quiet:
    """Silence a library logger below ERROR for a block."""

    def __init__(self, name: str):
        self.logger = logging.getLogger(name)

    def __enter__(self):
        self.level = self.logger.level
        self.logger.setLevel(logging.ERROR)

    def __exit__(self, *exc):
        self.logger.setLevel(self.level)


class FunctionReward(Verifier):
    """A user's own reward function f(completion, answer) -> float (or bool), given by `_target_`:

        reward:
          _target_: genlight.rewards.FunctionReward
          fn: {_target_: my_package.my_module.my_reward, _partial_: true}
    """

    name = "custom"

    def __init__(self, fn: Callable[[str, str], float], extract: Callable[[str], str | None] | None = None):
        if not callable(fn):
            raise TypeError(f"reward.fn must be callable, got {type(fn).__name__}")
        self.fn, self._extract = fn, extract
        self.name = getattr(fn, "__name__", None) or getattr(getattr(fn, "func", None), "__name__", "custom")

    def extract(self, completion: str) -> str | None:
        return self._extract(completion) if self._extract else super().extract(completion)

    def __call__(self, completion: str, answer: str) -> float:
        return float(self.fn(completion, answer))


def score(verifier: Callable[[str, str], float], prompts: list[str], completions: list[str], answers: list[str],
          on_error: str = "raise") -> tuple[list[float], int]:
    """Rewards of completions (prompts repeated per sample), and how many verifier calls raised.

    A verifier that raises is reported with the prompt that caused it: `on_error=raise` stops with
    a `RewardError` naming prompt, completion and verifier; `on_error=zero` scores 0 and counts it.
    """
    rewards, errors = [], 0
    for prompt, completion, answer in zip(prompts, completions, answers):
        try:
            r = float(verifier(completion, answer))
            if not math.isfinite(r):
                raise ValueError(f"returned a non-finite reward {r}")
        except Exception as e:  # noqa: BLE001 - a user's verifier may raise anything
            name = getattr(verifier, "name", type(verifier).__name__)
            msg = f"reward {name!r} raised {type(e).__name__}: {e} on prompt {prompt!r}, completion {completion!r}"
            if on_error == "raise":
                raise RewardError(msg + " (set algo.reward_on_error=zero to score such cases 0)") from e
            if errors == 0:
                log.warning(msg)
            errors, r = errors + 1, 0.0
        rewards.append(r)
    return rewards, errors


def passes(scores: torch.Tensor, truncated: torch.Tensor, pass_threshold: float = 1.0,
           truncated_fails: bool = True) -> torch.Tensor:
    """Which samples are correct (bool): the verifier's score reaches `pass_threshold` and, with `truncated_fails`,
    the completion ended by itself (a sample cut at max_new_tokens never finished its answer). The one definition
    of "correct" of RLVR's train/pass_rate and val/pass@k and of eval.py's test-time compute (which takes the
    checkpoint's algo.pass_threshold and algo.truncated_reward: set = truncated samples fail)."""
    ok = scores >= pass_threshold
    return ok & ~truncated.to(ok.device) if truncated_fails else ok


class RewardModel(torch.nn.Module):
    """r(prompt, completion) from a reward model directory (`AutoModelForSequenceClassification` with one output:
    algo=reward_model's `hf/` export, or any such local checkpoint): the RLHF reward.

    A frozen copy, never trained: a submodule of the RL module, so it sits on the trainer's device, is sharded with
    the policy under FSDP2 and is part of checkpoints. It scores text, re-tokenised with its own tokenizer as it was
    trained (prompt with the tokenizer's special tokens unless the chat template wrote them, completion + <eos>),
    in micro-batches of `batch_size` sequences without gradients. Options:
      normalize        whiten: (r - mean) / std with running statistics over every training score so far (all
                       processes; checkpointed), so that beta and verifier_weight keep their meaning
      verifier         what `correct` means for pass@k, majority voting and the logs (the model reward is not a
                       pass/fail): any verifier, exact match by default
      verifier_weight  r = r_model + verifier_weight * verifier(completion, answer) (0: the model alone)
    """

    name = "model"

    def __init__(self, pretrained: str, verifier: Verifier | None = None, verifier_weight: float = 0.0,
                 normalize: bool = False, batch_size: int = 64):
        super().__init__()
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        self.check_config({"pretrained": pretrained})
        if batch_size < 1:
            raise ValueError(f"reward.batch_size={batch_size}: must be >= 1")
        self.model = AutoModelForSequenceClassification.from_pretrained(pretrained, local_files_only=True)
        if self.model.config.num_labels != 1:
            raise ValueError(f"reward.pretrained={pretrained!r} has {self.model.config.num_labels} outputs; a reward "
                             "model has one (num_labels=1)")
        self.model.requires_grad_(False).eval()
        self.tokenizer = AutoTokenizer.from_pretrained(pretrained, local_files_only=True)
        if self.tokenizer.pad_token_id is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self.verifier = verifier or ExactAnswer()
        self.verifier_weight, self.normalize, self.batch_size = verifier_weight, normalize, batch_size
        # running count, mean and M2 of the raw scores (Chan et al.'s parallel update), checkpointed
        self.register_buffer("stats", torch.zeros(3, dtype=torch.float64))

    @staticmethod
    def check_config(cfg) -> None:
        """A missing reward model directory stops before any work (RLVRModule.check_config), naming the key."""
        path = cfg.get("pretrained")
        if not path or not Path(path).is_dir():
            raise FileNotFoundError(f"reward.pretrained={path!r} is not a directory holding a reward model "
                                    "(train one: python train.py algo=reward_model, then pass its hf/ export)")

    def extract(self, completion: str) -> str | None:
        return self.verifier.extract(completion)

    def train(self, mode: bool = True):
        return super().train(False)  # frozen: always in eval mode

    def _encode(self, prompt: str, completion: str) -> list[int]:
        tok = self.tokenizer
        templated = bool(tok.bos_token) and prompt.startswith(tok.bos_token)
        ids = tok(prompt, add_special_tokens=not templated)["input_ids"] + tok(completion, add_special_tokens=False)["input_ids"]
        return ids + ([tok.eos_token_id] if tok.eos_token_id is not None else [])

    @torch.no_grad()
    def raw_scores(self, prompts: list[str], completions: list[str]) -> torch.Tensor:
        """r_phi of each (prompt, completion), float32, on the model's device."""
        device = next(self.model.parameters()).device
        seqs = [self._encode(p, c) for p, c in zip(prompts, completions)]
        out = []
        for i in range(0, len(seqs), self.batch_size):
            part = seqs[i : i + self.batch_size]
            width = max(len(s) for s in part)
            ids = torch.tensor([s + [self.tokenizer.pad_token_id] * (width - len(s)) for s in part], device=device)
            mask = torch.tensor([[1] * len(s) + [0] * (width - len(s)) for s in part], device=device)
            out.append(self.model(input_ids=ids, attention_mask=mask, use_cache=False).logits[:, 0].float())
        return torch.cat(out) if out else torch.zeros(0, device=device)

    def _update_stats(self, r: torch.Tensor) -> None:
        batch = torch.stack([r.new_tensor(r.numel(), dtype=torch.float64), r.double().sum(), (r.double() ** 2).sum()])
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.all_reduce(batch)  # every process whitens with the same statistics
        if batch[0] == 0:
            return
        n_b, mean_b = batch[0], batch[1] / batch[0]
        m2_b = batch[2] - n_b * mean_b**2
        n_a, mean_a, m2_a = self.stats
        n = n_a + n_b
        delta = mean_b - mean_a
        self.stats.copy_(torch.stack([n, mean_a + delta * n_b / n, m2_a + m2_b + delta**2 * n_a * n_b / n]))

    def score_batch(self, prompts: list[str], completions: list[str], answers: list[str], update: bool = False,
                    truncated: torch.Tensor | None = None, truncated_reward: float | None = None,
                    verifier_scores: torch.Tensor | None = None) -> torch.Tensor:
        """The rewards of a step's samples (N,): the model's (whitened with `normalize`; `update` adds these
        scores to the running statistics first), plus verifier_weight x the verifier's (`verifier_scores` when the
        caller has them already: RLVR scores each sample once). With `truncated_reward`, the `truncated` samples
        score that value in the model's raw units, before whitening (it is not a model score: it stays out of the
        statistics), and their verifier part is 0."""
        r = self.raw_scores(prompts, completions)
        cut = (truncated.to(r.device) if truncated is not None and truncated_reward is not None
               else torch.zeros_like(r, dtype=torch.bool))
        if self.normalize and update:
            self._update_stats(r[~cut])  # on every process, also with nothing to add (a collective)
        r = torch.where(cut, torch.full_like(r, float(truncated_reward or 0.0)), r)
        if self.normalize:
            n, mean, m2 = self.stats.tolist()
            std = math.sqrt(m2 / (n - 1)) if n > 1 else 1.0
            r = (r - mean) / (std + 1e-6)
        if self.verifier_weight:
            v = verifier_scores if verifier_scores is not None else score(self.verifier, prompts, completions, answers)[0]
            r = r + self.verifier_weight * torch.as_tensor(v, dtype=r.dtype, device=r.device) * ~cut
        return r

    def forward(self, completion: str, answer: str) -> float:
        raise TypeError("reward=model scores (prompt, completion) pairs in batches: call score_batch")
