"""A single-player `textarena` game (MIT; its games run offline) as an environment on TRL's contract
(src/envs/tools.py): each move is a tool call, the game's messages come back as the tool's result, and the game's own
reward is the episode's (`get_reward`).

    env=textarena   # GuessTheNumber-v0-raw: a number in 1..20, hints "higher" / "lower", 10 guesses

The game is seeded from the row's `seed` column (else its `index`), so the G episodes of a prompt play the same game
(and a resumed run plays it again); `GameSeeds` makes such rows, disjoint across splits. `instructions` replaces the game's own opening prompt (~500 characters, more than a small
character-level policy can read) with a short one; the rules, the hints and the reward stay the game's. A game the
episode leaves unfinished (the policy stops moving, or runs out of turns or tokens first) scores 0: textarena gives
no reward before a game ends.

Partial credit is off by default (`partial_credit=false`: 1 for a win, 0 otherwise). Guess The Number pays a game
that ends without a win by how close the last guess was, and a second invalid move ends it too: repeating a guess of 5 in
1..10 scores 0.73 on average over 30 games (measured) without using a single hint, a reward the policy would learn
to collect. `partial_credit=true` passes the game's reward on.

`turn_bonus` (default 0) pays a Guess The Number win by the guesses it leaves unused: won at valid guess k of the K the
game allows, 1 + turn_bonus * (K - k) / K (invalid moves do not count, as in the game). Every win still pays at
least 1 (a pass), a loss is paid as above, and the win rate is measured as before; what changes is that among the
won games of a group the faster ones, the ones that used the hints, earn more. A game without a turn limit (2048)
has no K: with turn_bonus > 0 it stops at its first reset, naming the key.
"""

from __future__ import annotations

import random
import re

HINT = re.compile(r"target number is (higher|lower)", re.IGNORECASE)
GUESS = re.compile(r"\[(\d+)\]")  # textarena's own reading of a Guess The Number move


class TextArenaGame:
    """One textarena game per episode; its one tool is `move`."""

    # how a game is scored, not how it plays: a warm start's demonstrations do not depend on them (its cache key
    # leaves them out, src/lightning_modules/sft.py warm_start_key)
    reward_only = ("partial_credit", "turn_bonus")

    def __init__(self, env_id: str = "GuessTheNumber-v0-raw", instructions: str | None = None,
                 partial_credit: bool = False, turn_bonus: float = 0.0, **game_kwargs):
        try:
            import textarena as ta
        except ImportError:
            raise ImportError("env=textarena needs textarena: pip install 'textarena>=0.7.4,<0.8'") from None
        if env_id not in ta.envs.registration.ENV_REGISTRY:
            raise ValueError(f"env.environment.env_id={env_id!r} is not a textarena game; e.g. GuessTheNumber-v0-raw")
        self.env_id, self.instructions, self.game_kwargs = env_id, instructions, game_kwargs
        self.partial_credit = partial_credit
        if not turn_bonus >= 0:
            raise ValueError(f"env.environment.turn_bonus={turn_bonus!r}: must be >= 0 (0: a win pays 1)")
        self.turn_bonus = float(turn_bonus)
        self._ta, self.game, self.reward = ta, None, 0.0

    def reset(self, **row) -> str:
        state = random.getstate()  # textarena seeds Python's global RNG: leave the run's as it was
        try:
            self.game = self._ta.make(self.env_id, **self.game_kwargs)
            self.game.reset(num_players=1, seed=int(row.get("seed", row.get("index", 0))))
            _, opening = self.game.get_observation()
        finally:
            random.setstate(state)
        if self.turn_bonus and not isinstance(getattr(self.game.state, "max_turns", None), int):
            raise ValueError(f"env.environment.turn_bonus={self.turn_bonus}: {self.env_id} has no turn limit "
                             "(its state.max_turns) to pay a win's unused turns by; set turn_bonus=0")
        self.reward, self.done, self.history = 0.0, False, []
        return self.instructions or "\n".join(message for _, message, _ in opening)

    def move(self, action: str) -> str:
        """Make your move in the game; returns what the game says back.

        Args:
            action: the move, in the game's format (Guess The Number: the guess in square brackets, e.g. "[10]")
        """
        if self.done:
            return "The game is over."
        self.done, _ = self.game.step(action)
        if self.done:
            rewards, info = self.game.close()
            self.reward = float(rewards[0]) if rewards else 0.0
            reply = info[0].get("reason", "The game is over.")
        else:
            _, news = self.game.get_observation()
            reply = "\n".join(message for source, message, _ in news if source == -1)  # the game's, not our echo
        self.history.append((action, reply))
        return reply

    def metrics(self) -> dict[str, tuple[int, int]]:
        """Logged per episode, pooled (`Environment.metrics`): the hint consistency of the game's guesses (the share of
        them, after the first hint, that every earlier hint allows: `hint_consistency`)."""
        game = self.game
        return {"hint_consistency": hint_consistency(self.history, game.min_number - 1, game.max_number + 1)}

    def get_reward(self) -> float:
        """The game's reward; without `partial_credit`, 1 for a win and 0 otherwise; a win plus its `turn_bonus`."""
        won = self.reward >= 1.0
        reward = self.reward if self.partial_credit else float(won)
        if won and self.turn_bonus:
            # the game's own count: its valid guesses (an invalid move is not one: textarena forgives it, though two in
            # a row end the game), at most the K it allows (it checks its turn limit before counting the move)
            allowed = self.game.state.max_turns + 1
            reward += self.turn_bonus * (allowed - self.game.state.turn) / allowed
        return reward


def hint_consistency(history: list[tuple[str, str]], lo: float = float("-inf"),
                     hi: float = float("inf")) -> tuple[int, int]:
    """(consistent, judged) over a Guess The Number game's (move, reply) history: each move after the first hint is
    judged against the open interval (lo, hi) that the game's range and every earlier hint leave (after "higher" than
    g: > g; "lower": < g). A move the game does not read as a guess in its range (textarena's `[n]`) is judged
    inconsistent; only a hint narrows the interval."""
    consistent, judged, hinted = 0, 0, False
    for move, reply in history:
        m = GUESS.search(move or "")
        guess = int(m.group(1)) if m else None
        if hinted:
            judged += 1
            consistent += guess is not None and lo < guess < hi
        h = HINT.search(reply or "")
        if guess is not None and h:
            hinted = True
            lo, hi = (max(lo, guess), hi) if h.group(1).lower() == "higher" else (lo, min(hi, guess))
    return consistent, judged


class ScriptedPlayer:
    """A Guess The Number policy as a rollout engine (`generate` / `load_weights`), for baselines played through the
    episode code exactly as a trained policy plays (same prompts, tools, turns and budgets): it reads the
    conversation so far (the moves after the prompt and the game's hints) and writes its next move as a tool call.
    `strategy`: `uniform` (uniformly among the numbers not yet guessed, ignoring the hints: the warm start's
    demonstrations), `bisect` (the middle of the interval the hints leave: optimal, at most ceil(log2 n) guesses) or
    `ascending` (1, 2, 3, ...)."""

    STRATEGIES = ("uniform", "bisect", "ascending")

    def __init__(self, tokenizer, strategy: str, min_number: int = 1, max_number: int = 20):
        if strategy not in self.STRATEGIES:
            raise ValueError(f"strategy={strategy!r}: one of {list(self.STRATEGIES)}")
        self.tok, self.strategy, self.range = tokenizer, strategy, (min_number, max_number)
        marker = tokenizer.apply_chat_template([{"role": "user", "content": "x"}], add_generation_prompt=True,
                                               tokenize=False)
        self._after_prompt = marker[marker.index("x") + 1 :]  # the generation prompt: where the episode starts

    def load_weights(self, state_dict) -> None:
        pass

    def next_guess(self, text: str, generator=None) -> int:
        import torch

        episode = text.split(self._after_prompt, 1)[1] if self._after_prompt in text else ""
        guesses = [int(g) for g in re.findall(r'"action":\s*"\[(-?\d+)\]"', episode)]
        hints = HINT.findall(episode)
        lo, hi = self.range
        for g, h in zip(guesses, hints):
            lo, hi = (max(lo, g + 1), hi) if h.lower() == "higher" else (lo, min(hi, g - 1))
        if self.strategy == "bisect":
            return (lo + hi) // 2
        left = [n for n in range(self.range[0], self.range[1] + 1) if n not in guesses]
        if self.strategy == "ascending" or not left:
            return left[0] if left else self.range[0]
        return left[int(torch.randint(len(left), (1,), generator=generator))]

    def generate(self, ctx, mask, g, max_new_tokens, temperature=1.0, top_p=1.0, generator=None):
        import torch

        from genlight.models.rollout import Rollout

        rows = []
        for row, m in zip(ctx, mask):
            text = self.tok.decode(row[m.bool()].tolist(), skip_special_tokens=False)
            for _ in range(g):
                call = f'<tool_call>{{"name": "move", "arguments": {{"action": "[{self.next_guess(text, generator)}]"}}}}</tool_call>'
                ids = self.tok(call, add_special_tokens=False).input_ids + [self.tok.eos_token_id]
                rows.append(ids[:max_new_tokens])
        t = max(len(r) for r in rows)
        ids = torch.tensor([r + [self.tok.pad_token_id] * (t - len(r)) for r in rows])
        done = torch.tensor([[True] * len(r) + [False] * (t - len(r)) for r in rows])
        cut = torch.tensor([r[-1] != self.tok.eos_token_id for r in rows])
        return Rollout(ids, done, torch.zeros(ids.shape), cut)


class GameSeeds:
    """The rows of a game task: one prompt per game and its `seed` (disjoint across train / val / test), for
    `env=textarena` (the environment owns the reward: `answer` is a placeholder). `sft_rows`: a warm start's
    demonstrations, Guess The Number games played by guessing uniformly among the numbers not yet tried, ignoring the
    hints (they teach the format of a move, not how to use what the game says: that is left to RL). `environment`
    makes the games (the env's own factory, so the demonstrations play the game RL plays)."""

    def __init__(self, prompt: str = "Play.", n_train: int = 2000, n_val: int = 100, n_test: int = 200, seed: int = 0,
                 environment=None):
        self.prompt, self.environment = prompt, environment or TextArenaGame
        starts = {"train": 0, "val": n_train, "test": n_train + n_val}
        sizes = {"train": n_train, "val": n_val, "test": n_test}
        self.seeds = {k: range(seed + starts[k], seed + starts[k] + sizes[k]) for k in starts}

    def rows(self, split: str) -> list[tuple[str, dict]]:
        return [(f"game:{split}:{i}", {"prompt": self.prompt, "answer": "win", "seed": s})
                for i, s in enumerate(self.seeds[split])]

    def sft_rows(self, split: str) -> list[tuple[str, dict]]:
        """One row per demonstration game: the conversation up to its last move (the tool's hints included), every
        move an assistant tool-call turn; `data.assistant_turns=all` (conf/data/games.yaml) trains every move. (One
        row per move, the game so far its prompt, gives each forward pass a quarter of the moves to learn from: the
        default's warm start then did not learn to avoid repeated guesses, docs/rlvr.md.)"""
        import random as _random

        from genlight.envs.tools import Environment

        out = []
        for where, row in self.rows(split):
            game = self.environment()
            env = Environment(game)
            opening = game.reset(**row)
            if not hasattr(game.game, "max_number"):
                raise ValueError(f"data.source: demonstrations are Guess The Number games, not {game.env_id}")
            chat = [{"role": "user", "content": f"{row['prompt']}\n{opening}"}]
            rng = _random.Random(f"demo-{row['seed']}")  # not the game's own stream (it would guess the secret)
            left = list(range(game.game.min_number, game.game.max_number + 1))
            while not game.done:
                guess = left.pop(rng.randrange(len(left)))
                call = {"role": "assistant", "content": "", "tool_calls": [
                    {"type": "function", "function": {"name": "move", "arguments": {"action": f"[{guess}]"}}}]}
                result = game.move(f"[{guess}]")
                chat += [call, {"role": "tool", "name": "move", "content": result}]
            out.append((where, {"messages": chat[:-1], "tools": env.schemas}))  # the game's last reply is not trained
            env.close()
        return out
