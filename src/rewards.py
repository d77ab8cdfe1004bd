"""Verifiable rewards: r(completion, answer) in [0, 1], chosen with the Hydra group `reward=`.

A verifier reads model output as text and never evaluates it (no `eval`, no `sympy` parsing of
model output). Built-in verifiers never raise: malformed, empty, unicode or huge outputs score 0.
Each also has `extract(completion)`, the normalised final answer used for majority voting.

    exact    the stripped completion equals the answer
    numeric  the completion is a number within a tolerance of the answer
    math     the final answer (last \\boxed{...}, else the last number) equals the answer,
             numerically when both are numbers, else as normalised text
    custom   any Python callable f(completion, answer) -> float, by `_target_`
"""

from __future__ import annotations

import logging
import math
import re
import unicodedata
from collections.abc import Callable
from decimal import Decimal, InvalidOperation

log = logging.getLogger(__name__)

# digits with optional sign, thousands separators and decimals; bounded so a huge output stays cheap
_NUMBER = re.compile(r"[-+]?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?(?:[eE][-+]?\d+)?")
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


def last_boxed(text: str) -> str | None:
    """Content of the last \\boxed{...}, with nested braces balanced; None if absent or unclosed."""
    start = text.rfind("\\boxed{")
    if start < 0:
        return None
    depth, i = 0, start + len("\\boxed")
    for j in range(i, len(text)):
        depth += {"{": 1, "}": -1}.get(text[j], 0)
        if depth == 0:
            return text[i + 1 : j]
    return None


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


class MathAnswer(NumericAnswer):
    """The final answer of a worked solution: the last \\boxed{...}, else the last number in the text."""

    name = "math"

    def __init__(self, abs_tol: float = 1e-6, rel_tol: float = 0.0, require_boxed: bool = False):
        super().__init__(abs_tol, rel_tol)
        self.require_boxed = require_boxed

    def extract(self, completion: str) -> str | None:
        text = _normalise(completion[:_MAX_CHARS])
        boxed = last_boxed(text)
        if boxed is not None:
            value = parse_number(boxed)
            return str(value.normalize()) if value is not None else (boxed.strip() or None)
        if self.require_boxed:
            return None
        numbers = _NUMBER.findall(text)
        if not numbers:
            return None
        value = parse_number(numbers[-1])
        return None if value is None else str(value.normalize())

    def match(self, prediction: str, answer: str) -> bool:
        if parse_number(prediction) is not None and parse_number(answer) is not None:
            return super().match(prediction, answer)
        return prediction.replace(" ", "") == _normalise(answer).replace(" ", "")


class FunctionReward(Verifier):
    """A user's own reward function f(completion, answer) -> float (or bool), given by `_target_`:

        reward:
          _target_: src.rewards.FunctionReward
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
