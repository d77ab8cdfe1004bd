"""Multi-turn RL wired into RLVR (env=, src/envs/): the warm start's tool-use demonstrations are token for token the
contexts the policy meets in an episode, the RLVR step samples episodes with the tools shown in the prompt and scores
the last answer (or the environment's own reward), a group faces one task, and bad env configs stop before work."""

from __future__ import annotations

import types

import pytest
import torch

from genlight.envs.calculator import Calculator, CalculatorTask
from genlight.envs.episodes import tool_turn_text
from genlight.envs.tools import EnvSpec
from genlight.models.rollout import Rollout


def undocumented(x: int) -> int:
    return x


def toolless_tokenizer():
    """The character tokenizer with a chat template that ignores tools and tool calls."""
    from genlight.models import char_tokenizer

    tok = char_tokenizer()
    tok.chat_template = "{% for m in messages %}<|{{ m.role }}|>{{ m.content }}\n{% endfor %}"
    return tok


class Scripted:
    """An engine that 'samples' fixed turns (text, the same for every episode), with log-prob -0.1 per token."""

    def __init__(self, tok, turns: list[str]):
        self.tok, self.turns, self.contexts = tok, turns, []

    def generate(self, ctx, mask, g, max_new_tokens, temperature=1.0, top_p=1.0, generator=None):
        self.contexts.append([self.tok.decode(row[m.bool()]) for row, m in zip(ctx, mask)])
        text = self.turns[min(len(self.contexts), len(self.turns)) - 1]
        ids = self.tok(text, add_special_tokens=False).input_ids[:max_new_tokens - 1] + [self.tok.eos_token_id]
        n = ctx.size(0) * g
        return Rollout(torch.tensor([ids] * n), torch.ones(n, len(ids), dtype=torch.bool),
                       torch.full((n, len(ids)), -0.1), torch.zeros(n, dtype=torch.bool))

    def load_weights(self, state_dict):
        pass


CALL = '<tool_call>{"name": "calculate", "arguments": {"expression": "%s"}}</tool_call>'


def test_tool_demonstrations_are_the_episode_contexts_token_for_token(tokenizer):
    """The calculator task's two SFT rows per problem: the first is (the prompt with the tools shown -> the call), the
    second's prompt is that prompt + the call + <eos> + the chat template's tool turn, exactly what an RL episode
    feeds the policy after it sampled the call. A mismatch (an <eos> the template does not write, a newline trimmed)
    would teach the warm start contexts RL never shows."""
    from genlight.datamodules.lm import LMDataModule

    task = CalculatorTask(digits=3, n_train=8, n_val=4, n_test=4)
    dm = LMDataModule(task, tokenizer, kind="sft", max_length=256, batch_size=4)
    dm.setup("fit")
    call, answer = dm.examples["train"][:2]
    question = task.rows("train")[0][1]["messages"]
    expression = question[0]["content"].rstrip("=")
    rl_prompt = tokenizer(tokenizer.apply_chat_template(question, tools=task.schemas, add_generation_prompt=True,
                                                        tokenize=False), add_special_tokens=False).input_ids
    assert call["prompt_ids"] == rl_prompt
    assert tokenizer.decode(call["completion_ids"]) == CALL % expression + tokenizer.eos_token
    result = str(Calculator().calculate(expression))
    tool = tokenizer(tool_turn_text(tokenizer, [("calculate", result)]), add_special_tokens=False).input_ids
    assert answer["prompt_ids"] == rl_prompt + call["completion_ids"] + tool
    assert tokenizer.decode(answer["completion_ids"], skip_special_tokens=True) == str(eval(expression))
    # the no-tool baseline's warm start: the answer alone, no tools shown
    plain = CalculatorTask(digits=3, n_train=8, n_val=4, n_test=4, tool_demos=False).sft_rows("train")[0][1]
    assert plain["messages"][-1] == {"role": "assistant", "content": str(eval(expression))} and "tools" not in plain


def _module(cfg_factory, *overrides):
    from genlight.pipeline import build
    from tests.helpers import attach_trainer

    cfg = cfg_factory("experiment=calculator_tool", "algo.num_generations=2", "warm_start.max_steps=0",
                      "algo.generation_lag=0", "model.net.hidden_size=32", "model.net.num_layers=1",
                      "model.net.num_heads=2", "model.net.intermediate_size=64", *overrides)
    module = attach_trainer(build(cfg, warm_start=False)["module"]).train()
    module.optimizers = lambda: types.SimpleNamespace(zero_grad=lambda set_to_none=True: None, step=lambda: None)
    module.lr_schedulers = lambda: types.SimpleNamespace(step=lambda: None)
    module.manual_backward = lambda loss: loss.backward()
    logged = {}
    module.log = lambda k, v, **kw: logged.__setitem__(k, float(v))
    return module, logged


def _batch(tokenizer, questions: list[tuple[str, str]], columns: list[dict] | None = None) -> dict:
    from genlight.datamodules.lm import Collator

    examples = [{"prompt_ids": tokenizer(q).input_ids, "prompt": q, "reference": a, "index": i,
                 "chat": [{"role": "user", "content": q}], "columns": (columns or [{}] * len(questions))[i]}
                for i, (q, a) in enumerate(questions)]
    return Collator("prompt", tokenizer.pad_token_id)(examples)


def test_rlvr_step_samples_episodes_with_the_tools_and_scores_the_last_answer(cfg_factory, tokenizer):
    """One training step over scripted episodes (call the calculator, then answer): the prompts the trainer encodes
    are re-rendered with the tool's schema, the second turn's context holds the tool's result, the verifier scores
    the final answer (right for 12*34, wrong for 50*3: its answer is 408 too), the tool turn is out of the loss
    mask, turns / tool calls reach the logs and the episode table shows the tool turn."""
    module, logged = _module(cfg_factory)
    module.engine = Scripted(tokenizer, [CALL % "12*34", "408"])
    tables = {}
    module.log_table = lambda key, columns, rows: tables.__setitem__(key, dict(zip(columns, rows[0])))
    batch = _batch(tokenizer, [("12*34=", "408"), ("50*3=", "150")])
    module.training_step(batch, 0)
    # the W&B table of episodes shows the tool turn
    assert tables["train/completions"]["completion"] == f"[assistant] {CALL % '12*34'}\n[calculate] 408\n[assistant] 408"
    prompts = tokenizer.batch_decode(batch["prompt_input_ids"], skip_special_tokens=False)
    assert all("<|tools|>calculate(expression)\n<|user|>" in p for p in prompts)
    second = module.engine.contexts[1]
    assert len(second) == 4 and all(c.endswith(CALL % "12*34" + "</s>\n<|tool|>408\n<|assistant|>") for c in second)
    torch.testing.assert_close(module.last_batch["rewards_all"], torch.tensor([[1.0, 1.0], [0.0, 0.0]]))
    assert logged["train/turns/mean"] == 2 and logged["train/tool_calls"] == 1 and logged["train/tool_errors"] == 0
    assert logged["train/truncation_rate"] == 0
    # the policy's tokens are the call and the answer (each with its <eos>); the tool turn's are not
    n_policy = len(tokenizer(CALL % "12*34", add_special_tokens=False).input_ids) + 1 + len("408") + 1
    assert logged["train/completion_length"] == n_policy


class Guess:
    """A game on TRL's contract: guess the secret, which reset draws from the row's index; the environment owns the
    reward (1 for a right guess, whatever the final text says)."""

    def reset(self, **row) -> str:
        self.secret, self.won = row.get("secret", row["index"] % 3), False
        return "Guess 0, 1 or 2."

    def guess(self, n: int) -> str:
        """Guess the secret.

        Args:
            n: the guess
        """
        self.won = n == self.secret
        return "right" if self.won else "wrong"

    def get_reward(self) -> float:
        return float(self.won)


class Unfair(Guess):
    """A reset whose text differs between the episodes of one prompt."""

    count = 0

    def reset(self, **row) -> str:
        Unfair.count += 1
        return f"Game {Unfair.count}"


def test_environment_reward_replaces_the_verifier_and_reset_text_reaches_the_prompt(cfg_factory, tokenizer):
    module, logged = _module(cfg_factory, "env.environment._target_=tests.test_multiturn.Guess")
    module.engine = Scripted(tokenizer, ['<tool_call>{"name": "guess", "arguments": {"n": 1}}</tool_call>', "done"])
    batch = _batch(tokenizer, [("play", "x"), ("play", "x")])  # index 0: secret 0; index 1: secret 1
    module.training_step(batch, 0)
    prompt = tokenizer.decode(batch["prompt_input_ids"][0], skip_special_tokens=True)
    assert "<|tools|>guess(n)\n<|user|>play\nGuess 0, 1 or 2.\n<|assistant|>" in prompt
    torch.testing.assert_close(module.last_batch["rewards_all"], torch.tensor([[0.0, 0.0], [1.0, 1.0]]))
    # the row's other columns reach reset (TRL's reset(**row)): here they set the secret
    module.engine = Scripted(tokenizer, ['<tool_call>{"name": "guess", "arguments": {"n": 1}}</tool_call>', "done"])
    module.training_step(_batch(tokenizer, [("play", "x"), ("play", "x")], [{"secret": 1}, {"secret": 2}]), 0)
    torch.testing.assert_close(module.last_batch["rewards_all"], torch.tensor([[1.0, 1.0], [0.0, 0.0]]))

    module, _ = _module(cfg_factory, "env.environment._target_=tests.test_multiturn.Unfair")
    module.engine = Scripted(tokenizer, ["done"])
    with pytest.raises(ValueError, match="different texts: a group must face the same task"):
        module.training_step(_batch(tokenizer, [("play", "x")]), 0)


@pytest.mark.parametrize("override, message", [
    ("env.max_turns=0", "env.max_turns=0: an episode has at least one turn"),
    ("env.environment._target_=genlight.envs.nowhere.Game", "env.environment 'genlight.envs.nowhere.Game' does not import"),
    ("env.tools=[tests.test_multiturn.undocumented]", "tool 'undocumented'.*type hint on every argument and a "
                                                      "docstring"),
    ("model.tokenizer._target_=tests.test_multiturn.toolless_tokenizer",
     "model.tokenizer: the chat template has no tool support"),
])
def test_bad_env_configs_stop_before_work(cfg_factory, override, message):
    from genlight.lightning_modules.rlvr import RLVRModule

    cfg = cfg_factory("experiment=calculator_tool", override)
    with pytest.raises(ValueError, match=message):
        RLVRModule.check_config(cfg)


@pytest.mark.parametrize("overrides, key", [
    (["model.net.max_position_embeddings=64", "env.max_tokens=60"], "env.max_tokens=60"),
    (["model.net.max_position_embeddings=32", "algo.max_new_tokens=30"], "algo.max_new_tokens=30"),
])
@pytest.mark.parametrize("stage", ["train", "val"])
def test_a_prompt_and_its_budget_past_the_models_positions_stop_naming_the_keys(cfg_factory, tokenizer, overrides,
                                                                               key, stage):
    """The tiny Llama (rotary) would run past its positions without an error; before sampling, a prompt plus
    env.max_tokens (episodes) or algo.max_new_tokens (one completion) over max_position_embeddings stops, naming the
    keys, in training and in validation alike. At the limit itself it samples."""
    module, _ = _module(cfg_factory, *overrides)
    if key.startswith("algo."):  # one completion per prompt
        module.env = None
    module.engine = module.eval_engine = Scripted(tokenizer, ["6"])
    batch = _batch(tokenizer, [("12*34=", "408")])
    step = module.training_step if stage == "train" else (lambda b, i: module._eval_step(b, i, "val"))
    with pytest.raises(ValueError, match=rf"a prompt of \d+ tokens \+ {key.replace('.', '[.]')} = \d+ positions, more "
                                         r"than the model's \d+ \(max_position_embeddings\)"):
        step(batch, 0)
    from genlight.models.lm import check_positions

    limit = module.model.config.max_position_embeddings
    check_positions(module.model, limit - 10, 10, key.split("=")[0])  # exactly at the limit: allowed


def test_env_spec_needs_an_environment_or_tools():
    with pytest.raises(ValueError, match="give an environment class"):
        EnvSpec()


def test_warm_start_greedy_check_can_write_a_whole_tool_call(cfg_factory, monkeypatch, tokenizer):
    """The warm start's greedy exact match generates as many tokens as the longest val completion (a tool call is
    ~80 characters): with a fixed 16 it could never match a call, and the warm start would never reach its target."""
    import genlight.lightning_modules.sft as sft

    seen = {}

    def fake(net, tok, dm, target, max_steps, *args):
        seen["max_new_tokens"] = args[-1]
        return net(tokenizer=tok), {"warm_start/exact_match": 0.0, "warm_start/steps": 0.0}

    monkeypatch.setattr(sft, "warm_start", fake)
    cfg = cfg_factory("experiment=calculator_tool", "model.net.hidden_size=32", "model.net.num_layers=1",
                      "model.net.num_heads=2", "model.net.intermediate_size=64")
    sft.warm_start_net(cfg, tokenizer, target=0.4, max_steps=1)
    longest = max(len(CALL % row["messages"][0]["content"].rstrip("=")) for _, row in CalculatorTask(
        digits=3, n_train=64, n_val=16, n_test=16).rows("val"))
    assert seen["max_new_tokens"] == longest + 1  # + <eos>


def test_a_textarena_game_is_played_through_tool_calls_with_the_games_reward(cfg_factory, tokenizer):
    """Guess The Number (textarena's own game, seeded by the row's index): an episode that guesses right wins the
    game's reward 1, one that stops after a wrong guess leaves the game unfinished (0), the game's hints are the
    tool turns, and the run's Python RNG is left as it was."""
    import random

    from genlight.envs.textarena import TextArenaGame

    secrets = []
    for index in (0, 1):
        game = TextArenaGame()
        game.reset(index=index)
        secrets.append(game.game.game_number)
    wrong = min(set(range(1, 21)) - set(secrets))
    module, logged = _module(cfg_factory, "env=textarena", "env.max_turns=3", "env.max_tokens=200",
                             "model.net.max_position_embeddings=512")
    move = '<tool_call>{"name": "move", "arguments": {"action": "[%d]"}}</tool_call>'
    module.engine = Scripted(tokenizer, [move % secrets[0], "ok"])
    batch = _batch(tokenizer, [("play", "-"), ("play", "-")])
    state = random.getstate()
    module.training_step(batch, 0)
    assert random.getstate() == state
    torch.testing.assert_close(module.last_batch["rewards_all"], torch.tensor([[1.0, 1.0], [0.0, 0.0]]))
    # the second game: a wrong guess, the game's hint back, then the policy stops: unfinished, 0
    module.engine = Scripted(tokenizer, [move % wrong, "ok"])
    module.training_step(_batch(tokenizer, [("play", "-"), ("play", "-")]), 0)
    hint = "higher" if secrets[0] > wrong else "lower"
    assert any(f"The target number is {hint}." in c for c in module.engine.contexts[1])
    torch.testing.assert_close(module.last_batch["rewards_all"], torch.zeros(2, 2))


def test_every_env_option_builds_with_its_tools_schemas(cfg_factory):
    """Each conf/env/ option instantiates (the environment makes an instance, its tools have schemas)."""
    import hydra

    from tests.test_configs import options

    names = {}
    for option in options("env"):
        spec = hydra.utils.instantiate(cfg_factory("algo=rlvr", f"env={option}").algo.env)
        names[option] = None if spec is None else [s["function"]["name"] for s in spec.schemas]
    assert names == {"calculator": ["calculate"], "textarena": ["move"], "none": None}


def test_game_partial_credit_is_off_unless_asked_a_repeated_guess_earns_nothing():
    """Junk probe of the game's reward: repeated guesses end the game (invalid moves) with textarena's partial
    credit (how close the last guess was); by default that pays 0, with partial_credit=true the game's value."""
    from genlight.envs.textarena import TextArenaGame

    paid = {}
    for partial in (False, True):
        rewards = []
        for seed in range(10):
            game = TextArenaGame(max_number=10, max_turns=5, partial_credit=partial)
            game.reset(seed=seed)
            if game.game.game_number == 5:
                continue
            for _ in range(3):  # a guess, then the same twice: textarena forgives one invalid move, not two
                game.move("[5]")
            assert game.done
            rewards.append(game.get_reward())
        paid[partial] = rewards
    assert paid[False] == [0.0] * len(paid[False]) and len(paid[False]) >= 5
    assert all(0 < r < 1 for r in paid[True])


def test_game_turn_bonus_pays_a_win_by_the_guesses_it_leaves_and_keeps_it_a_pass():
    """turn_bonus: a win at valid guess k of the K = 6 the game allows (textarena's max_turns=5) pays 1 + b (K - k) / K,
    by hand; invalid moves do not count; a lost game pays 0; every win still passes (>= 1)."""
    import torch

    from genlight.envs.textarena import TextArenaGame
    from genlight.rewards import passes

    def play(guesses, bonus, seed):
        game = TextArenaGame(max_number=10, max_turns=5, turn_bonus=bonus)
        game.reset(seed=seed)
        target = game.game.game_number
        for g in guesses(target):
            if game.done:
                break
            game.move(f"[{g}]")
        return game, target

    seen = set()
    for seed in range(12):
        for k in range(1, 7):  # win at guess k: k - 1 misses (numbers other than the target), then the target
            game, target = play(lambda t, k=k: [n for n in range(1, 11) if n != t][: k - 1] + [t], 0.5, seed)
            assert game.done and len(game.history) == k
            assert game.get_reward() == pytest.approx(1 + 0.5 * (6 - k) / 6)
            seen.add(k)
        lost, target = play(lambda t: [n for n in range(1, 11) if n != t], 0.5, seed)
        assert lost.done and len(lost.history) == 6 and lost.get_reward() == 0.0
        # invalid moves (junk, a repeat) between guesses are not guesses: textarena lets the 6th valid guess win, and
        # it is paid as one (1.0), not below a pass
        misses = [n for n in range(1, 11) if n != target][:5]
        moves = [misses[0], "x", misses[1], misses[1], misses[2], "x", misses[3], "x", misses[4], "x", target]
        junk, _ = play(lambda t, moves=moves: moves, 0.5, seed)
        assert junk.done and len(junk.history) == 11 and junk.reward == 1.0 and junk.get_reward() == 1.0
    assert seen == set(range(1, 7))
    won = torch.tensor([1 + 0.5 * 5 / 6, 1.0, 0.0])
    assert passes(won, torch.zeros(3, dtype=torch.bool)).tolist() == [True, True, False]
    with pytest.raises(ValueError, match="env.environment.turn_bonus=-1"):
        TextArenaGame(turn_bonus=-1)
    # a game without a turn limit has no unused turns to pay: it stops at the first reset, naming the key and game
    TextArenaGame("2048-v0-raw").reset(seed=0)
    with pytest.raises(ValueError, match=r"env.environment.turn_bonus=0.5: 2048-v0-raw has no turn limit"):
        TextArenaGame("2048-v0-raw", turn_bonus=0.5).reset(seed=0)


def test_game_demonstrations_are_the_episode_contexts_and_seeds_are_disjoint(tokenizer):
    """GameSeeds: the splits' games have disjoint seeds; a demonstration is one whole game whose ids are those an
    episode builds (each move, its <eos>, the template's tool turn with the game's hint, the next move), every move
    trained and no hint (data.assistant_turns=all)."""
    import functools

    from genlight.datamodules.lm import LMDataModule
    from genlight.datamodules.packing import IGNORE
    from genlight.envs.textarena import GameSeeds, TextArenaGame
    from genlight.envs.tools import parse_tool_calls

    environment = functools.partial(TextArenaGame, instructions="Guess 1..10 with move.", max_number=10, max_turns=5)
    task = GameSeeds(n_train=4, n_val=2, n_test=2, environment=environment)
    seeds = [{r["seed"] for _, r in task.rows(split)} for split in ("train", "val", "test")]
    assert sum(map(len, seeds)) == len(set().union(*seeds)) == 8
    dm = LMDataModule(task, tokenizer, kind="sft", max_length=2048, batch_size=2, assistant_turns="all")
    dm.setup("fit")
    assert len(dm.examples["train"]) == 4  # one per game
    for (_, row), example in zip(task.rows("train"), dm.examples["train"]):
        assert "Guess 1..10 with move." in example["prompt"] and "<|tools|>move(action)" in example["prompt"]
        game = environment()
        game.reset(**row)
        ids, built, moves = example["completion_ids"], [], 0
        labels = example.get("completion_labels", ids)  # a game won on its first move is one turn
        while not game.done:  # replay the game from the demonstration's trained turns
            end = ids.index(tokenizer.eos_token_id, len(built)) + 1
            assert labels[len(built):end] == ids[len(built):end]  # the move and its <eos>: trained
            (call,) = parse_tool_calls(tokenizer.decode(ids[len(built):end], skip_special_tokens=True))
            built += ids[len(built):end]
            hint = game.move(**call.arguments)
            moves += 1
            if not game.done:
                tool = tokenizer(tool_turn_text(tokenizer, [("move", hint)]), add_special_tokens=False).input_ids
                assert ids[len(built):len(built) + len(tool)] == tool and set(labels[len(built):len(built) + len(tool)]) == {IGNORE}
                built += tool
        assert built == ids and moves >= 1
    assert any("completion_labels" in e for e in dm.examples["train"])  # some game takes several moves


@pytest.mark.parametrize("form", ["messages_prompt", "chat_column_map"])
def test_chat_prompts_render_as_messages_in_episodes_as_in_single_turn(tokenizer, tmp_path, form):
    """A row whose prompt is a list of chat messages (TRL's conversational format), or a plain prompt made a chat by
    `data.chat=true` with a system prompt: the episode's prompt is the chat template's rendering of those messages
    (the system prompt a system message) with the tools, as single-turn renders them without. Before, the list
    reached the policy as its Python repr inside one user message."""
    import json

    from genlight.datamodules.files import FileSource
    from genlight.datamodules.lm import LMDataModule
    from genlight.envs.episodes import reset_groups

    system, question = "Answer with the number only.", "What is 12*34?"
    row = ({"prompt": [{"role": "system", "content": system}, {"role": "user", "content": question}], "answer": "408"}
           if form == "messages_prompt" else {"prompt": question, "answer": "408"})
    path = tmp_path / "prompts.jsonl"
    path.write_text(json.dumps(row) + "\n")
    kw = {"chat": True, "system_prompt": system} if form == "chat_column_map" else {}
    dm = LMDataModule(FileSource(train=str(path), val=str(path)), tokenizer, kind="prompt", **kw)
    dm.setup("fit")
    batch = next(iter(dm.val_dataloader()))
    messages = [{"role": "system", "content": system}, {"role": "user", "content": question}]
    single = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert batch["prompts"][0] == single  # single-turn's rendering
    spec = EnvSpec(environment=Calculator)
    prompts, envs = reset_groups(spec, tokenizer, batch["chats"], batch["references"], batch["index"].tolist(),
                                 batch["columns"], 2)
    for e in envs:
        e.close()
    shown = tokenizer.decode(prompts[0], skip_special_tokens=False)
    assert shown == tokenizer.apply_chat_template(messages, tools=spec.schemas, add_generation_prompt=True,
                                                  tokenize=False)
    assert f"<|system|>{system}" in shown and "'role'" not in shown


def test_the_game_preset_plays_its_six_guesses_and_its_baselines_are_the_games_own(tmp_path):
    """experiment=guess_the_number documents 1..10 in 6 guesses. Played through the episode code by scripted policies
    (scripts/game_baselines.py): bisection wins every game (a move of "[10]" fits a turn), guessing 1, 2, 3, ... wins
    exactly the games whose number is at most 6 (the 6th guess reaches the game), each counted from the games' own
    targets; uniform guessing ignores the hints (consistency below bisection's 1.0). Before: 5 guesses reached the
    game and a move of 10 was cut at max_new_tokens."""
    import sys

    import genlight
    from genlight.envs.textarena import TextArenaGame
    from tests.helpers import ROOT

    sys.path.insert(0, str(ROOT / "scripts"))
    from game_baselines import play

    cfg = genlight.compose(["experiment=guess_the_number", "logger=none"], output_dir=tmp_path)
    games = 16
    seeds = [row["seed"] for _, row in hydra_rows(cfg, "val")[:games]]
    targets = []
    for s in seeds:
        g = TextArenaGame(max_number=10, max_turns=5)
        g.reset(seed=s)
        targets.append(g.game.game_number)
    # the check bites: a game only the 6th guess wins (6), games ascending loses (> 6), a game whose number is 10
    assert 6 in targets and max(targets) == 10
    bisect = play(cfg, "bisect", "val", games, 1)
    assert bisect["win_rate"] == 1.0 and bisect["hint_consistency"] == 1.0
    ascending = play(cfg, "ascending", "val", games, 1)
    assert ascending["win_rate"] == pytest.approx(sum(t <= 6 for t in targets) / games)
    uniform = play(cfg, "uniform", "val", games, 2)
    assert uniform["hint_consistency"] < 0.9 and uniform["turns"] <= 6


def hydra_rows(cfg, split):
    import hydra

    return hydra.utils.instantiate(cfg.data.source).rows(split)


def test_the_games_hint_consistency_is_logged_pooled_over_the_steps_episodes(cfg_factory, tokenizer):
    """train/env/hint_consistency: the share of guesses after the first hint that every earlier hint allows, pooled
    over the step's episodes (sum / sum), here against the games' own histories counted apart; a policy that bisects
    is consistent on every guess."""
    from genlight.envs.textarena import ScriptedPlayer

    module, logged = _module(cfg_factory, "env=textarena", "env.max_turns=6", "env.max_tokens=900",
                             "+env.environment.max_number=10", "algo.max_new_tokens=80",
                             "model.net.max_position_embeddings=1024")
    games = []
    make = module.env.make

    def recording():
        env = make()
        games.append(env.instance)
        return env

    module.env.make = recording
    batch = [("play", "-"), ("play", "-"), ("play", "-")]
    for strategy in ("uniform", "bisect"):
        games.clear()
        module.engine = ScriptedPlayer(tokenizer, strategy, 1, 10)
        module.training_step(_batch(tokenizer, batch), 0)
        judged = [g.metrics()["hint_consistency"] for g in games]
        assert sum(j for _, j in judged) > 0, "no guess after a hint: the test would not bite"
        want = sum(c for c, _ in judged) / sum(j for _, j in judged)
        assert logged["train/env/hint_consistency"] == pytest.approx(want)
        assert (want == 1.0) == (strategy == "bisect")  # uniform guessing ignores the hints
    # and held out: val/env/hint_consistency, pooled over the split's batches
    games.clear()
    module.eval_engine = ScriptedPlayer(tokenizer, "uniform", 1, 10)
    for i in range(2):
        module._eval_step(_batch(tokenizer, batch), i, "val")
    module._eval_epoch_end("val")
    judged = [g.metrics()["hint_consistency"] for g in games]
    assert logged["val/env/hint_consistency"] == pytest.approx(sum(c for c, _ in judged) / sum(j for _, j in judged))
    # a guess outside what the hints leave lowers it: 5 ("lower" if the number is below), then 9
    from genlight.envs.textarena import hint_consistency

    assert hint_consistency([("[5]", "The target number is lower."), ("[9]", "The target number is lower."),
                             ("[2]", "The target number is higher."), ("[3]", "x")]) == (2, 3)


def test_hint_consistency_judges_moves_the_game_does_not_read_as_inconsistent():
    """A move outside the game's range ([0], [25]) or not in its format ("[ 3 ]") gets no hint from textarena (an
    invalid move): it is judged inconsistent and narrows nothing; before, the interval started unbounded and the
    looser pattern read such moves, which counted as consistent."""
    from genlight.envs.textarena import TextArenaGame

    def play(moves):
        game = TextArenaGame(max_number=10, max_turns=20)
        game.reset(seed=0)
        assert game.game.game_number == 7
        for m in moves:
            game.move(m)
        return game.metrics()["hint_consistency"]

    assert play(["[9]", "[5]", "[8]", "[7]"]) == (3, 3)
    for moves in (["[9]", "[0]", "[5]", "[7]"], ["[1]", "[25]", "[8]", "[7]"], ["[9]", "[ 3 ]", "[5]", "[7]"]):
        assert play(moves) == (2, 3), moves
