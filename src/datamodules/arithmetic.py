"""A seeded synthetic arithmetic task with verifiable answers: `a+b=` -> the exact result.

Problems are drawn without replacement from the whole problem space (a, op, b), then cut into
disjoint train/val/test splits, so no problem is seen in two splits. The same generator feeds
SFT examples (prompt -> answer), DPO pairs (correct vs. corrupted answer) and RLVR prompts.
"""

from __future__ import annotations

import operator
import random
from dataclasses import dataclass

OPS = {"+": operator.add, "-": operator.sub, "*": operator.mul}


@dataclass(frozen=True)
class Problem:
    a: int
    op: str
    b: int

    @property
    def prompt(self) -> str:
        return f"{self.a}{self.op}{self.b}="

    @property
    def answer(self) -> str:
        return str(OPS[self.op](self.a, self.b))


class ArithmeticTask:
    """Integer arithmetic on operands of up to `digits` digits with operators from `ops`."""

    def __init__(
        self,
        digits: int = 2,
        ops: tuple[str, ...] | list[str] = ("+",),
        n_train: int = 8000,
        n_val: int = 500,
        n_test: int = 1000,
        seed: int = 1234,
    ):
        bad = [op for op in ops if op not in OPS]
        if bad or not ops:
            raise ValueError(f"data.source.ops={list(ops)}: each operator must be one of {list(OPS)}")
        if digits < 1:
            raise ValueError(f"data.source.digits={digits}: must be >= 1")
        self.digits, self.ops, self.seed = digits, list(ops), seed
        self.n = {"train": n_train, "val": n_val, "test": n_test}
        base = 10**digits
        space = base * base * len(self.ops)
        if sum(self.n.values()) > space:
            raise ValueError(
                f"data.source.n_train+n_val+n_test={sum(self.n.values())} exceeds the {space} distinct "
                f"problems with digits={digits}, ops={self.ops}"
            )
        # Sample problem indices without replacement, then decode index -> (a, op, b).
        idx = random.Random(seed).sample(range(space), sum(self.n.values()))
        problems = [Problem(i // (base * len(self.ops)), self.ops[i % len(self.ops)], (i // len(self.ops)) % base) for i in idx]
        self.splits: dict[str, list[Problem]] = {}
        start = 0
        for split, k in self.n.items():
            self.splits[split] = problems[start : start + k]
            start += k

    def rows(self, split: str) -> list[tuple[str, dict]]:
        """(where, row) pairs; a row has `prompt`, `completion` and `answer`."""
        return [
            (f"arithmetic:{split}:{i}", {"prompt": p.prompt, "completion": p.answer, "answer": p.answer})
            for i, p in enumerate(self.splits[split])
        ]

    def preference_rows(self, split: str, seed: int = 0) -> list[tuple[str, dict]]:
        """DPO pairs: chosen = the correct answer, rejected = a corrupted one (seeded per split)."""
        rng = random.Random(f"{self.seed}-{seed}-{split}")
        return [
            (where, {**row, "chosen": row["answer"], "rejected": self.corrupt(row["answer"], rng)})
            for where, row in self.rows(split)
        ]

    @staticmethod
    def corrupt(answer: str, rng: random.Random) -> str:
        """A plausible wrong answer: the true one off by a small non-zero amount, or digits swapped."""
        value = int(answer)
        digits = answer.lstrip("-")
        if len(digits) >= 2 and digits[0] != digits[-1] and rng.random() < 0.3:
            wrong = answer[: len(answer) - len(digits)] + digits[-1] + digits[1:-1] + digits[0]
            if wrong.lstrip("-")[0] != "0":
                return wrong
        delta = rng.choice([d for d in range(-10, 11) if d != 0])
        return str(value + delta)
