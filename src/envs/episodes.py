"""Multi-turn episodes on any rollout engine: generate until the turn ends, run the tool calls it makes, append
their results, generate again, up to `max_turns` turns and `max_tokens` completion tokens.

What is trained is exactly what was sampled: the policy's token ids are kept as the engine returned them (never
decoded and re-tokenised: a BPE tokenizer may encode the decoded text differently), and the tool turns are appended
as token ids of the chat template's own rendering of the tool messages. `Episodes.policy_mask` marks the tokens the
policy wrote (True) against the tool turns (False): the loss, the KL and the token counts of the aggregation use it,
and the sampler's log-probs (`logps`) are recorded for policy tokens only (0 elsewhere).

`rollout=hf` keeps each episode's KV cache across its turns (`HFRollout.episodes`): a turn prefills only the ids its
cache does not hold (the tool turn), so an episode costs its tokens, not its tokens times its turns. An engine without
such a session (vLLM) gets each turn's whole context (`Reprefill`); vLLM's prefix cache finds the context's KV blocks.

A turn ends at <eos> or at the per-turn `max_new_tokens`. Every assistant turn within `max_turns` has its tool calls
run, the last one's included (a game played with `max_turns` moves sees all of them). A turn is the episode's last
when it calls no tool (the policy answered), when its calls end the environment (an environment may say so with a
`done` attribute: a game won or lost), when it is the `max_turns`-th, or when the token budget is spent before the
episode ends: only then, or when a turn runs to `max_new_tokens`, is the episode `truncated` (as a completion cut at
max_new_tokens is in single-turn RL). An episode its environment ended keeps the environment's reward, whatever
budget it had left.
"""

from __future__ import annotations

import dataclasses

import torch

from genlight.envs.tools import Environment, parse_tool_calls
from genlight.models.rollout import Rollout
from genlight.models.tokenizer import after_assistant_turn


def tool_turn_text(tokenizer, results: list[tuple[str, str]]) -> str:
    """The text the chat template puts between the end of an assistant turn's content and the next generation
    prompt, around the tool messages `results` ([(tool name, content)]): rendered after a placeholder turn, so it
    holds the template's own end-of-turn text, the tool messages and the generation prompt. The leading <eos> is
    dropped when the template writes it (the policy sampled its own)."""
    tools = [{"role": "tool", "name": n, "content": c} for n, c in results]
    suffix = after_assistant_turn(tokenizer, tools, add_generation_prompt=True)
    if suffix is None:
        raise ValueError("the chat template does not render an assistant turn's content: it cannot hold a tool turn")
    eos = tokenizer.eos_token or ""
    return suffix[len(eos):] if eos and suffix.startswith(eos) else suffix


@dataclasses.dataclass
class Episodes(Rollout):
    """N episodes as a `Rollout` (what RL trains on), right-padded to the longest completion (T tokens):
    `completion_ids` holds the policy's tokens and the tool turns' in order, `completion_mask` all of them (attention,
    positions), `policy_mask` the policy's (loss, KL, token counts), `logps` log pi_gen of each policy token (0
    elsewhere), `truncated` the episodes cut by the per-turn limit or the token budget."""

    turns: torch.Tensor | None = None  # (N,) long: assistant turns
    tool_calls: torch.Tensor | None = None  # (N,) long
    tool_errors: torch.Tensor | None = None  # (N,) long: calls that came back as an error message
    messages: list[list[dict]] = dataclasses.field(default_factory=list)  # each episode as chat messages (W&B table)
    env_rewards: torch.Tensor | None = None  # (N,) the environments' own rewards (get_reward), when they have one
    env_metrics: dict = dataclasses.field(default_factory=dict)  # name -> (sum, count): `environment_metrics`

    @property
    def answers(self) -> list[str]:
        """Each episode's last assistant turn: what the verifier scores."""
        return [next((m["content"] for m in reversed(ms) if m["role"] == "assistant"), "") for ms in self.messages]

    def transcripts(self) -> list[str]:
        """Each episode as text, the tool turns shown (the W&B table of episodes)."""
        return ["\n".join(f"[{m.get('name', m['role'])}] {m['content']}" for m in ms) for ms in self.messages]


class Reprefill:
    """The turns of an engine that keeps nothing between calls (vLLM, whose prefix cache finds the contexts' KV
    blocks again by itself): each turn's whole contexts, left-padded, in one `generate` call; the first turn's are the
    prompts, each prefilled once for its G samples."""

    def __init__(self, engine, prompt_ids: list[list[int]], num_samples: int, pad: int):
        self.engine, self.prompts, self.g, self.pad, self.first = engine, prompt_ids, num_samples, pad, True
        model = getattr(engine, "model", None)  # contexts go where the engine's model is; vLLM's take CPU ids
        self.device = next(model.parameters()).device if isinstance(model, torch.nn.Module) else "cpu"

    def running(self, local: bool) -> bool:
        return local

    def generate(self, episodes: list[int], contexts: list[list[int]], max_new_tokens: int, temperature: float = 1.0,
                 top_p: float = 1.0, generator: torch.Generator | None = None) -> Rollout:
        contexts, g = (self.prompts, self.g) if self.first else (contexts, 1)  # the G samples share the prefill
        self.first = False
        ctx = _pad([list(c) for c in contexts], self.pad, torch.long, "left").to(self.device)
        mask = _pad([[1] * len(c) for c in contexts], 0, torch.long, "left").to(self.device)
        return self.engine.generate(ctx, mask, g, max_new_tokens, temperature, top_p, generator)


def run_episodes(engine, tokenizer, prompt_ids: list[list[int]], envs: list[Environment], num_samples: int,
                 max_turns: int, max_new_tokens: int, max_tokens: int, temperature: float = 1.0, top_p: float = 1.0,
                 generator: torch.Generator | None = None) -> Episodes:
    """`num_samples` episodes per prompt (prompt i's are rows i*G .. i*G+G-1, as single-turn rollouts), each with its
    own environment from `envs` (already reset: one per episode, N = prompts x G). An engine that offers
    `episodes(prompt_ids, num_samples)` (an `EpisodeSession`: HFRollout keeps each episode's KV cache across its
    turns) samples the turns through it; any other gets each turn's whole context (`Reprefill`)."""
    if max_turns < 1:
        raise ValueError(f"max_turns={max_turns}: an episode has at least one turn")
    if max_tokens < 1 or max_new_tokens < 1:
        raise ValueError(f"max_tokens={max_tokens}, max_new_tokens={max_new_tokens}: both must be >= 1")
    n = len(prompt_ids) * num_samples
    if len(envs) != n:
        raise ValueError(f"{len(envs)} environments for {n} episodes: one each")
    pad, eos = tokenizer.pad_token_id, tokenizer.eos_token_id
    offered = getattr(engine, "episodes", None)  # HFRollout: the KV caches kept across turns
    session = offered(prompt_ids, num_samples) if offered is not None else Reprefill(engine, prompt_ids, num_samples, pad)
    ids: list[list[int]] = [[] for _ in range(n)]
    policy: list[list[bool]] = [[] for _ in range(n)]
    logps: list[list[float]] = [[] for _ in range(n)]
    messages: list[list[dict]] = [[] for _ in range(n)]
    turns, calls, errors = [0] * n, [0] * n, [0] * n
    truncated = [False] * n
    active = list(range(n))
    for turn in range(max_turns):
        if not session.running(bool(active)):  # under FSDP2, while any process has episodes running
            break
        budget = {i: max_tokens - len(ids[i]) for i in active}
        contexts = [list(prompt_ids[i // num_samples]) + ids[i] for i in active]
        roll = session.generate(active, contexts, min(max_new_tokens, max(budget.values(), default=1)), temperature,
                                top_p, generator)
        nxt = []
        for row, i in enumerate(active):
            k = int(roll.completion_mask[row].sum())
            k = min(k, budget[i])  # a batch's shared length may exceed this episode's budget
            new = roll.completion_ids[row, :k].tolist()
            ids[i] += new
            policy[i] += [True] * k
            logps[i] += roll.logps[row, :k].tolist()
            turns[i] += 1
            ended = bool(new) and new[-1] == eos
            text = tokenizer.decode(new, skip_special_tokens=True)
            messages[i].append({"role": "assistant", "content": text})
            if not ended:  # cut by the per-turn limit or the budget: the episode stops, as a truncated completion
                truncated[i] = True
                continue
            found = parse_tool_calls(text)
            if not found:  # the policy answered: its episode ends here
                continue
            results = []
            for call in found:  # every turn's calls run, the last turn's too (their results then end the episode)
                res = envs[i].call(call)
                calls[i] += 1
                errors[i] += res.error
                results.append((call.name or "?", res.content))
                messages[i].append({"role": "tool", "name": call.name or "?", "content": res.content})
            if envs[i].done or turn == max_turns - 1:  # ended by its environment, or no turn left to read the results
                continue
            tool = tokenizer(tool_turn_text(tokenizer, results), add_special_tokens=False).input_ids
            if len(ids[i]) + len(tool) >= max_tokens:  # no room left to answer after the tool turn
                truncated[i] = True
                continue
            ids[i] += tool
            policy[i] += [False] * len(tool)
            logps[i] += [0.0] * len(tool)
            nxt.append(i)
        active = nxt
    return Episodes(
        completion_ids=_pad(ids, pad, torch.long),
        completion_mask=_pad([[True] * len(x) for x in ids], False, torch.bool),
        policy_mask=_pad(policy, False, torch.bool),
        logps=_pad(logps, 0.0, torch.float32),
        truncated=torch.tensor(truncated),
        turns=torch.tensor(turns),
        tool_calls=torch.tensor(calls),
        tool_errors=torch.tensor(errors),
        messages=messages,
    )


def reset_groups(spec, tokenizer, chats: list[list[dict]], answers: list[str], indices: list[int],
                 columns: list[dict], g: int) -> tuple[list[list[int]], list[Environment]]:
    """One environment per episode (`spec`: an `EnvSpec`), `g` per prompt, each reset on its row (TRL's contract:
    `reset(prompt=<the chat>, answer=<the reference>, index=<its position in the split>, **<its other columns>)`), and
    each prompt's ids: its chat with the reset's text appended to the last user message, rendered with the tools'
    schemas. A group whose resets differ is refused: its episodes must face one task (advantages compare them)."""
    prompts, envs = [], []
    for chat, answer, index, extra in zip(chats, answers, indices, columns):
        group = [spec.make() for _ in range(g)]
        envs += group
        shown = {e.reset(**{**extra, "prompt": chat, "answer": answer, "index": index}) for e in group}
        if len(shown) > 1:
            for e in envs:
                e.close()
            raise ValueError(f"env: reset gave the {g} episodes of one prompt (index {index}) different texts: a "
                             "group must face the same task (seed the environment from the row, e.g. `index`)")
        text = shown.pop()
        if text:
            chat = [*chat[:-1], {**chat[-1], "content": f"{chat[-1]['content']}\n{text}"}]
        rendered = tokenizer.apply_chat_template(chat, tools=spec.schemas, add_generation_prompt=True, tokenize=False)
        prompts.append(tokenizer(rendered, add_special_tokens=False).input_ids)
    return prompts, envs


def environment_metrics(envs: list[Environment]) -> dict[str, tuple[float, float]]:
    """The environments' own measurements (`Environment.metrics`), each (sum of numerators, sum of denominators)."""
    out: dict[str, list[float]] = {}
    for e in envs:
        for k, (num, den) in e.metrics().items():
            acc = out.setdefault(k, [0.0, 0.0])
            acc[0], acc[1] = acc[0] + num, acc[1] + den
    return {k: (a, b) for k, (a, b) in out.items()}


def environment_rewards(envs: list[Environment]) -> torch.Tensor | None:
    """The environments' own rewards (`get_reward`), or None when they have none (the verifier scores)."""
    rewards = [e.reward() for e in envs]
    if all(r is None for r in rewards):
        return None
    if any(r is None for r in rewards):
        raise ValueError("env: get_reward returned None for some episodes and a number for others")
    return torch.tensor(rewards, dtype=torch.float32)


def left_padded(prompts: list[list[int]], pad: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Prompt ids and attention mask, left-padded (as the datamodule's batches)."""
    return _pad(prompts, pad, torch.long, "left"), _pad([[1] * len(p) for p in prompts], 0, torch.long, "left")


def _pad(rows: list[list], value, dtype: torch.dtype, side: str = "right") -> torch.Tensor:
    return torch.nn.utils.rnn.pad_sequence([torch.tensor(r, dtype=dtype) for r in rows], batch_first=True,
                                           padding_value=value, padding_side=side)
