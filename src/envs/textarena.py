"""A single-player `textarena` game (MIT; its games run offline) as an environment on TRL's contract
(src/envs/tools.py): each move is a tool call, the game's messages come back as the tool's result, and the game's own
reward is the episode's (`get_reward`).

    env=textarena   # GuessTheNumber-v0-raw: a number in 1..20, hints "higher" / "lower", 10 guesses

The game is seeded from the row's `index`, so the G episodes of a prompt play the same game (and a resumed run
plays it again). `instructions` replaces the game's own opening prompt (~500 characters, more than a small
character-level policy can read) with a short one; the rules, the hints and the reward stay the game's. A game the
episode leaves unfinished (the policy stops moving, or runs out of turns or tokens first) scores 0: textarena gives
no reward before a game ends.
"""

from __future__ import annotations

import random


class TextArenaGame:
    """One textarena game per episode; its one tool is `move`."""

    def __init__(self, env_id: str = "GuessTheNumber-v0-raw", instructions: str | None = None, **game_kwargs):
        try:
            import textarena as ta
        except ImportError:
            raise ImportError("env=textarena needs textarena: pip install 'textarena>=0.7.4,<0.8'") from None
        if env_id not in ta.envs.registration.ENV_REGISTRY:
            raise ValueError(f"env.environment.env_id={env_id!r} is not a textarena game; e.g. GuessTheNumber-v0-raw")
        self.env_id, self.instructions, self.game_kwargs = env_id, instructions, game_kwargs
        self._ta, self.game, self.reward = ta, None, 0.0

    def reset(self, **row) -> str:
        state = random.getstate()  # textarena seeds Python's global RNG: leave the run's as it was
        try:
            self.game = self._ta.make(self.env_id, **self.game_kwargs)
            self.game.reset(num_players=1, seed=int(row.get("index", 0)))
            _, opening = self.game.get_observation()
        finally:
            random.setstate(state)
        self.reward, self.done = 0.0, False
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
            return info[0].get("reason", "The game is over.")
        _, news = self.game.get_observation()
        return "\n".join(message for source, message, _ in news if source == -1)  # the game's, not our echo

    def get_reward(self) -> float:
        return self.reward
