"""Multi-turn episodes (src/envs/episodes.py): the trained ids are the sampled ids byte for byte across a tool turn,
tool-turn tokens are masked out and carry no sampler log-prob, the sampler's and the trainer's log-probs agree on the
policy's tokens at lag 0, and the turn and token budgets end episodes as documented."""

from __future__ import annotations

import pytest
import torch

from genlight.envs.episodes import run_episodes, tool_turn_text
from genlight.envs.tools import Environment, ToolCall
from genlight.models.rollout import Rollout
from tests.helpers.checkpoints import bpe_tokenizer

CALL = '<tool_call>{"name": "add", "arguments": {"a": 12, "b": 30}}</tool_call>'


def add(a: int, b: int) -> int:
    """Add two integers.

    Args:
        a: the first
        b: the second
    """
    return a + b


def char_ids(tok, text: str) -> list[int]:
    """`text` one byte-level character per token: a valid encoding BPE would never produce (it merges)."""
    return tok.convert_tokens_to_ids([tok.backend_tokenizer.pre_tokenizer.pre_tokenize_str(c)[0][0] for c in text])


class Scripted:
    """An engine that 'samples' the given turns (the same for every episode), with known log-probs."""

    def __init__(self, turns: list[list[int]]):
        self.turns, self.calls = turns, []

    def generate(self, ctx, mask, g, max_new_tokens, temperature=1.0, top_p=1.0, generator=None):
        self.calls.append((ctx.clone(), mask.clone(), g, max_new_tokens))
        ids = self.turns[len(self.calls) - 1][:max_new_tokens]
        n = ctx.size(0) * g
        return Rollout(torch.tensor([ids] * n), torch.ones(n, len(ids), dtype=torch.bool),
                       -torch.arange(1, len(ids) + 1, dtype=torch.float32).repeat(n, 1) / 10, torch.zeros(n, dtype=bool))


def test_trained_ids_are_the_sampled_ids_across_a_tool_turn():
    tok = bpe_tokenizer()
    eos = tok.eos_token_id
    turn1, turn2 = char_ids(tok, CALL) + [eos], char_ids(tok, "42") + [eos]
    # the test bites: decoding and re-encoding the policy's text gives other ids
    assert tok(tok.decode(turn1[:-1]), add_special_tokens=False).input_ids != turn1[:-1]
    text = tok.apply_chat_template([{"role": "user", "content": "12+30?"}], add_generation_prompt=True, tokenize=False)
    prompt = tok(text, add_special_tokens=False).input_ids
    engine = Scripted([turn1, turn2])
    envs = [Environment(tools=[add]) for _ in range(2)]
    ep = run_episodes(engine, tok, [prompt], envs, num_samples=2, max_turns=3, max_new_tokens=200, max_tokens=400)
    tool = tok(tool_turn_text(tok, [("add", "42")]), add_special_tokens=False).input_ids
    assert tok.decode(tool) == "\n<|im_start|>tool\n42<|im_end|>\n<|im_start|>assistant\n"  # the template's, no 2nd eos
    for i in range(2):
        n = int(ep.lengths[i])
        assert ep.completion_ids[i, :n].tolist() == turn1 + tool + turn2
        assert ep.policy_mask[i, :n].tolist() == [True] * len(turn1) + [False] * len(tool) + [True] * len(turn2)
        assert (ep.logps[i, :n][~ep.policy_mask[i, :n]] == 0).all()
        assert ep.logps[i, len(turn1) + len(tool):n].tolist() == pytest.approx(
            [-(k + 1) / 10 for k in range(len(turn2))])
    assert ep.turns.tolist() == [2, 2] and ep.tool_calls.tolist() == [1, 1] and ep.tool_errors.tolist() == [0, 0]
    assert not ep.truncated.any()
    assert ep.messages[0][1] == {"role": "tool", "name": "add", "content": "42"}
    # turn 2 continued from the prompt + the exact ids so far, once per episode (left-padded contexts)
    ctx, mask, g, _ = engine.calls[1]
    assert g == 1 and ctx[0][mask[0].bool()].tolist() == prompt + turn1 + tool


def test_turn_and_token_budgets_end_episodes():
    tok = bpe_tokenizer()
    eos = tok.eos_token_id
    turn1 = char_ids(tok, CALL) + [eos]
    prompt = [1, 2, 3]
    # max_turns=1: the last turn's tool call runs; no tool turn is appended (no turn left to read it), not truncated
    ep = run_episodes(Scripted([turn1]), tok, [prompt], [Environment(tools=[add])], 1, max_turns=1,
                      max_new_tokens=200, max_tokens=400)
    assert ep.turns.tolist() == [1] and ep.tool_calls.tolist() == [1] and not ep.truncated.any()
    assert int(ep.lengths[0]) == len(turn1) and ep.messages[0][-1] == {"role": "tool", "name": "add", "content": "42"}
    # a budget that ends inside the first turn: cut there, truncated
    ep = run_episodes(Scripted([turn1]), tok, [prompt], [Environment(tools=[add])], 1, max_turns=3,
                      max_new_tokens=200, max_tokens=10)
    assert int(ep.lengths[0]) == 10 and ep.truncated.tolist() == [True]
    # a budget with no room to answer after the tool turn: the tool turn is not appended, truncated
    ep = run_episodes(Scripted([turn1, turn1]), tok, [prompt], [Environment(tools=[add])], 1, max_turns=3,
                      max_new_tokens=200, max_tokens=len(turn1) + 3)
    assert int(ep.lengths[0]) == len(turn1) and ep.truncated.tolist() == [True] and ep.tool_calls.tolist() == [1]
    with pytest.raises(ValueError, match="max_turns=0: an episode has at least one turn"):
        run_episodes(Scripted([turn1]), tok, [prompt], [Environment(tools=[add])], 1, max_turns=0,
                     max_new_tokens=8, max_tokens=8)


def test_sampler_and_trainer_logps_agree_on_policy_tokens_at_lag_0(monkeypatch):
    """A real tiny policy sampling several turns (every finished turn calls a tool that echoes), then the trainer's
    forward over prompt + the whole episode: equal log-probs on the policy's tokens."""
    import genlight.envs.episodes as episodes
    from genlight.models import char_tokenizer, tiny_llama
    from genlight.models.rollout import HFRollout

    tok = char_tokenizer("0123456789+=<|>\nuseratniol")  # a small vocabulary: a random policy ends turns often
    tok.chat_template = ("{% for m in messages %}<|{{ m.role }}|>{{ m.content }}\n{% endfor %}"
                         "{% if add_generation_prompt %}<|assistant|>{% endif %}")

    def echo(x: str) -> str:
        """Echo.

        Args:
            x: text
        """
        return x

    monkeypatch.setattr(episodes, "parse_tool_calls", lambda text: [ToolCall("echo", {"x": text[:3]})])
    torch.manual_seed(0)
    model = tiny_llama(tok, hidden_size=32, num_layers=2, num_heads=2, intermediate_size=64)
    engine = HFRollout(model, tok.eos_token_id, tok.pad_token_id)
    engine.model.eval()
    prompts = [tok(f"<|user|>{q}\n<|assistant|>").input_ids for q in ("1+2", "30+4", "7+15", "2+2")]
    envs = [Environment(tools=[echo]) for _ in range(8)]
    gen = torch.Generator().manual_seed(0)
    ep = run_episodes(engine, tok, prompts, envs, num_samples=2, max_turns=3, max_new_tokens=16, max_tokens=64,
                      temperature=1.0, generator=gen)
    assert (~ep.policy_mask & ep.completion_mask).any(), "no tool turn was taken: the test would not bite"
    from tests.helpers import episode_logps

    logp = episode_logps(model, tok.pad_token_id, prompts, ep)
    m = ep.policy_mask
    torch.testing.assert_close(logp[m], ep.logps[m], atol=1e-4, rtol=1e-4)


def test_tool_turn_tokens_carry_no_loss_no_kl_and_no_count_in_the_rlvr_step(cfg_factory):
    """RLVRModule.policy_update on an episode with a tool turn (policy_mask False there), beta > 0 with the KL in the
    loss: the gradient does not move when the sampler's or the reference's log-probs of tool tokens change (zero loss
    weight, zero KL), it does when a policy token's change (the check bites), and the token aggregation divides by
    the policy's tokens only."""
    import types

    from genlight.pipeline import build
    from genlight.rl.loss import rlvr_loss
    from tests.helpers import attach_trainer

    cfg = cfg_factory("algo=rlvr", "algo.beta=0.1", "algo.loss_agg=token", "algo.adv_norm=none",
                      "algo.num_generations=2", "warm_start.max_steps=0", "model.net.hidden_size=32",
                      "model.net.num_layers=1", "model.net.num_heads=2", "model.net.intermediate_size=64")
    module = attach_trainer(build(cfg, warm_start=False)["module"]).train()
    params = [p for p in module.model.parameters() if p.requires_grad]
    grads = []

    class Recorder:  # the optimizer's place: records the step's gradient instead of applying it
        def zero_grad(self, set_to_none=True):
            module.model.zero_grad(set_to_none=True)

        def step(self):
            grads.append(torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).flatten() for p in params]))

    module.optimizers = lambda: Recorder()
    module.lr_schedulers = lambda: types.SimpleNamespace(step=lambda: None)
    module.manual_backward = lambda loss: loss.backward()
    g, t = 2, 7
    batch = {"prompt_input_ids": torch.tensor([[0, 1, 20, 21], [1, 22, 23, 24]]),
             "prompt_attention_mask": torch.tensor([[0, 1, 1, 1], [1, 1, 1, 1]])}
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(5, 60, (4, t), generator=gen)
    cmask = torch.ones(4, t, dtype=torch.bool)
    cmask[3, 5:] = False
    policy = cmask.clone()
    policy[:, 2:4] = False  # a two-token tool turn in every episode
    logps = (-torch.rand(4, t, generator=gen) * 3).masked_fill(~policy, 0.0)
    ref = -torch.rand(4, t, generator=gen) * 3
    adv = torch.tensor([[1.0, -0.5], [0.3, -1.2]])
    keep = torch.ones(2, dtype=torch.bool)

    def step(lp, rl):
        roll = Rollout(ids, cmask, lp, torch.zeros(4, dtype=torch.bool), policy)
        loss, *_ = module.policy_update(batch, roll, adv, keep, ref_logp=rl)
        return loss

    loss = step(logps, ref)
    tool = ~policy & cmask
    step(logps + 4.0 * tool, ref - 5.0 * tool)  # tool tokens: other sampler and reference log-probs
    step(logps, ref + 1.0 * torch.nn.functional.one_hot(torch.tensor(5), t).bool().expand(4, t))  # a policy token's
    torch.testing.assert_close(grads[1], grads[0])
    assert not torch.allclose(grads[2], grads[0])
    # token aggregation: the policy's tokens count, the tool turn's do not
    from genlight.models.logps import completion_logps

    with torch.no_grad():
        lp, _ = completion_logps(module.model, batch["prompt_input_ids"], batch["prompt_attention_mask"], ids, cmask,
                                 group=g, with_entropy=False)
    expect, _ = rlvr_loss(lp.view(2, g, t), logps.view(2, g, t), adv, policy.view(2, g, t), keep, "cispo", "token",
                          5.0, ref_logp=ref.view(2, g, t), beta=0.1, with_stats=False)
    torch.testing.assert_close(loss, expect, atol=1e-5, rtol=1e-5)


class Counter:
    """A game on TRL's contract (plus `done`): `guess` wins at the `win_at`-th call; `get_reward` 1 for a win."""

    def __init__(self, win_at: int = 99, reply: str = "no"):
        self.win_at, self.reply, self.calls, self.done, self.won = win_at, reply, 0, False, False

    def reset(self, **row) -> None:
        return None

    def guess(self, n: int) -> str:
        """Guess.

        Args:
            n: the guess
        """
        self.calls += 1
        self.done = self.won = self.calls >= self.win_at
        return "you win" if self.won else self.reply

    def get_reward(self) -> float:
        return float(self.won)


GUESS = '<tool_call>{"name": "guess", "arguments": {"n": 5}}</tool_call>'


def test_every_turn_within_max_turns_has_its_calls_run_the_last_ones_too():
    """A game won at the 3rd guess, played with max_turns=3: before, the 3rd turn's call never reached the game (2 of
    3 moves were played, the game could not be won)."""
    from genlight.envs.episodes import environment_rewards

    tok = bpe_tokenizer()
    turn = char_ids(tok, GUESS) + [tok.eos_token_id]
    games = [Counter(win_at=3)]
    ep = run_episodes(Scripted([turn] * 3), tok, [[1, 2, 3]], [Environment(g) for g in games], 1, max_turns=3,
                      max_new_tokens=200, max_tokens=10_000)
    assert games[0].calls == 3 and ep.tool_calls.tolist() == [3] and ep.turns.tolist() == [3]
    assert environment_rewards([Environment(g) for g in games]).tolist() == [1.0] and not ep.truncated.any()


def test_an_episode_its_environment_ended_keeps_its_reward_whatever_its_budget():
    """The winning move reaches the game, then the game's reply does not fit the token budget: before, the episode
    was marked truncated (its reward then replaced by truncated_reward, and it did not pass); now it ended with the
    game: not truncated, no further turn sampled."""
    tok = bpe_tokenizer()
    turn = char_ids(tok, GUESS) + [tok.eos_token_id]
    engine = Scripted([turn] * 3)
    game = Counter(win_at=1, reply="x" * 500)
    long_reply = tok(tool_turn_text(tok, [("guess", "you win")]), add_special_tokens=False).input_ids
    ep = run_episodes(engine, tok, [[1, 2, 3]], [Environment(game)], 1, max_turns=3, max_new_tokens=200,
                      max_tokens=len(turn) + len(long_reply) - 1)  # the reply to the win does not fit
    assert game.won and ep.truncated.tolist() == [False] and len(engine.calls) == 1 and ep.turns.tolist() == [1]
    # a game still running when the budget is spent is truncated, as before
    running = Counter(win_at=99, reply="x" * 500)
    ep = run_episodes(Scripted([turn] * 3), tok, [[1, 2, 3]], [Environment(running)], 1, max_turns=3,
                      max_new_tokens=200, max_tokens=len(turn) + 5)
    assert not running.done and ep.truncated.tolist() == [True]
