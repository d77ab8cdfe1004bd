"""Baselines of a game preset, played through the episode code with the preset's own rules, prompts and seeds: what a
trained policy's win rate is compared with.

    python scripts/game_baselines.py                                   # experiment=guess_the_number, val and test
    python scripts/game_baselines.py --games 50 --plays 4 --splits val

Each strategy (`genlight.envs.textarena.ScriptedPlayer`: uniform among the numbers not yet guessed, the warm start's
demonstrations; bisect, the optimal play; ascending, 1, 2, 3, ...) plays every game of the split `--plays` times as
RLVR's evaluation plays them (`reset_groups`, `run_episodes`, the environment's reward), and the table gives its win
rate and its hint consistency (the share of guesses, after the first hint, consistent with every hint so far).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


def play(cfg, strategy: str, split: str, games: int | None, plays: int, seed: int = 0) -> dict:
    """Win rate and hint consistency of `strategy` over the split's games (the first `games`), `plays` episodes each."""
    import hydra

    from genlight.envs.episodes import environment_rewards, reset_groups, run_episodes
    from genlight.envs.textarena import ScriptedPlayer
    from genlight.rewards import passes

    tok = hydra.utils.instantiate(cfg.model.tokenizer)
    dm = hydra.utils.instantiate(cfg.data, tokenizer=tok, kind="prompt", eval_batch_size=50)
    dm.setup("fit")
    examples = dm.examples[split][:games] if games else dm.examples[split]
    spec = hydra.utils.instantiate(cfg.algo.env)
    game = cfg.algo.env.environment
    player = ScriptedPlayer(tok, strategy, game.get("min_number", 1), game.get("max_number", 20))
    g = torch.Generator().manual_seed(seed)
    wins, consistent, judged, turns = [], 0, 0, []
    for i in range(0, len(examples), 25):
        batch = dm.collate(examples[i : i + 25])
        prompts, envs = reset_groups(spec, tok, batch["chats"], batch["references"], batch["index"].tolist(),
                                     batch["columns"], plays)
        try:
            ep = run_episodes(player, tok, prompts, envs, plays, spec.max_turns, cfg.algo.max_new_tokens,
                              spec.max_tokens, generator=g)
            # a win is a pass, as RLVR counts it (a reward with env.environment.turn_bonus can exceed 1)
            wins += passes(environment_rewards(envs), ep.truncated, cfg.algo.pass_threshold).float().tolist()
            for e in envs:
                c, j = e.metrics()["hint_consistency"]
                consistent, judged = consistent + c, judged + j
            turns += ep.turns.tolist()
        finally:
            for e in envs:
                e.close()
    return {"games": len(examples), "episodes": len(wins), "win_rate": sum(wins) / len(wins),
            "hint_consistency": consistent / max(judged, 1), "turns": sum(turns) / len(turns)}


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--experiment", default="guess_the_number")
    p.add_argument("--strategies", default="uniform,bisect,ascending")
    p.add_argument("--splits", default="val,test")
    p.add_argument("--games", type=int, default=None, help="the first N games of each split (default: all)")
    p.add_argument("--plays", type=int, default=4, help="episodes per game (the preset's val_num_samples)")
    p.add_argument("overrides", nargs="*", help="config overrides, as train.py takes them")
    args = p.parse_args(argv)
    import genlight

    with tempfile.TemporaryDirectory() as d:
        cfg = genlight.compose([f"experiment={args.experiment}", "logger=none", *args.overrides], output_dir=d)
    print(f"experiment={args.experiment}: {cfg.algo.env.max_turns} turns, game "
          f"{dict(cfg.algo.env.environment)}, {args.plays} plays a game")
    print("| strategy | split | games | episodes | win rate | hint consistency | turns |")
    print("|---|---|---|---|---|---|---|")
    for strategy in args.strategies.split(","):
        for split in args.splits.split(","):
            r = play(cfg, strategy, split, args.games, args.plays)
            print(f"| {strategy} | {split} | {r['games']} | {r['episodes']} | {r['win_rate']:.3f} | "
                  f"{r['hint_consistency']:.3f} | {r['turns']:.2f} |")
            sys.stdout.flush()


if __name__ == "__main__":
    main()
