"""A small multi-turn task that only a policy using its tool can solve, for the learning test of episodes.

Each row hides a secret letter; the prompt says nothing of it, the one tool (`peek`) returns it, and the answer is
scored by exact match against it. The warm start's demonstrations call the tool and then answer a letter drawn at
random (not the tool's result): the format of an episode, with a pass rate of 1 / len(letters). Rising above that
takes reading the tool's turn, which RL over episodes has to learn (the game's setting, at a size CI can run).
"""

from __future__ import annotations

import random

from genlight.envs.tools import tool_schema

LETTERS = "ABCD"


class Vault:
    """The environment (TRL's environment_factory contract): `reset` keeps the row's secret, `peek` returns it."""

    def __init__(self):
        self.secret = ""

    def reset(self, **row) -> None:
        self.secret = row["answer"]

    def peek(self) -> str:
        """Read the secret letter."""
        return self.secret


class VaultTask:
    """Rows `{"messages": [user: "open"], "answer": <letter>}`, the letters drawn by the seed; `sft_rows` the
    demonstrations (the call, then a random letter after the tool's result)."""

    def __init__(self, n_train: int = 512, n_val: int = 64, n_test: int = 64, seed: int = 0, demo_copy: float = 0.0):
        rng = random.Random(seed)
        self.demo_copy = demo_copy
        self.secrets = {k: [rng.choice(LETTERS) for _ in range(n)]
                        for k, n in (("train", n_train), ("val", n_val), ("test", n_test))}
        self.schemas = [tool_schema(Vault().peek)]

    def rows(self, split: str) -> list[tuple[str, dict]]:
        return [(f"vault:{split}:{i}", {"messages": [{"role": "user", "content": "open"}], "answer": s})
                for i, s in enumerate(self.secrets[split])]

    def sft_rows(self, split: str) -> list[tuple[str, dict]]:
        rng = random.Random(f"demo-{split}")
        call = {"role": "assistant", "content": "", "tool_calls": [
            {"type": "function", "function": {"name": "peek", "arguments": {}}}]}
        out = []
        for where, row in self.rows(split):
            result = {"role": "tool", "name": "peek", "content": row["answer"]}
            answer = row["answer"] if rng.random() < self.demo_copy else rng.choice(LETTERS)
            out.append((f"{where}:call", {"messages": [*row["messages"], call], "tools": self.schemas}))
            out.append((f"{where}:answer", {"messages": [*row["messages"], call, result,
                                                         {"role": "assistant", "content": answer}],
                                            "tools": self.schemas}))
        return out


CALL = '<tool_call>{"name": "peek", "arguments": {}}</tool_call>'


def vault_tokenizer():
    """The default character tokenizer with the chat template's markers and the one tool call as single tokens
    (added tokens: matched whole before the characters): an episode is ~17 tokens, not ~90, so CI can train on it."""
    from genlight.models.tokenizer import char_tokenizer

    tok = char_tokenizer()
    tok.add_tokens(["<|tools|>peek()\n", "<|user|>", "<|assistant|>", "<|tool|>", CALL])
    return tok
