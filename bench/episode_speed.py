"""Multi-turn episodes: the KV cache kept across turns against re-prefilling every turn's whole context.

    OMP_WAIT_POLICY=PASSIVE python bench/episode_speed.py [--rounds 3] [--prompts 8] [--samples 4] [--turns 5]

The same episodes both ways: a 33.6 M Llama (hidden 512, 8 layers, random init, fp32) on a 30-token vocabulary, so
that a turn ends at <eos> after ~30 tokens on average (at most `--max-new` = 96); every finished turn calls a
scripted tool (`parse_tool_calls` replaced: echo the turn's first 8 characters, ~25-token tool turns), up to
`--turns` turns or 480 episode tokens. Prompts of ~90 tokens, 8 prompts x 4 samples, temperature 1, one generator
seed per round shared by both variants (same batch shapes: the same samples, checked).

  reprefill  run_episodes on an engine without an episode session: each turn's whole context, left-padded, through
             HFRollout.generate (the path of rollout=hf before the cache was kept; vLLM's path)
  cache      HFRollout.episodes: each episode's KV cache kept, a turn prefills only its new ids

Reported: episode tokens per second (the policy's sampled tokens / wall seconds of run_episodes), median and min-max
over the rounds (alternating), the ratio of medians, and the context tokens each variant fed the model per policy
token (prefill + decoding, padding not counted).
"""

from __future__ import annotations

import argparse
import random
import statistics
import time

import torch
from machine import cpu_name  # bench/machine.py

import genlight.envs.episodes as episodes
from genlight.envs.episodes import run_episodes
from genlight.envs.tools import Environment, ToolCall
from genlight.models import char_tokenizer, tiny_llama
from genlight.models.rollout import HFRollout

ALPHABET = "0123456789+=<|>\nuseratniol"  # + 4 specials: <eos> ~1/30 per token under a random init
TEMPLATE = ("{% for m in messages %}<|{{ m.role }}|>{{ m.content }}\n{% endfor %}"
            "{% if add_generation_prompt %}<|assistant|>{% endif %}")


def echo(x: str) -> str:
    """Echo.

    Args:
        x: text
    """
    return x


class Plain:
    """The engine without `episodes`: run_episodes re-prefills every turn's whole context."""

    def __init__(self, engine: HFRollout):
        self.model, self.generate = engine.model, engine.generate


def fed_counter(model) -> tuple[list[int], object]:
    """Real (unmasked) tokens of every forward pass of the transformer stack."""
    fed = []

    def record(module, args, kwargs):
        ids, mask = kwargs["input_ids"], kwargs["attention_mask"]
        fed.append(int(mask[:, -ids.size(1):].sum()))

    return fed, model.model.register_forward_pre_hook(record, with_kwargs=True)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--prompts", type=int, default=8)
    ap.add_argument("--samples", type=int, default=4)
    ap.add_argument("--turns", type=int, default=5)
    ap.add_argument("--max-new", type=int, default=96)
    ap.add_argument("--max-tokens", type=int, default=480)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    tok = char_tokenizer(ALPHABET)
    tok.chat_template = TEMPLATE
    episodes.parse_tool_calls = lambda text: [ToolCall("echo", {"x": text[:8]})]  # the scripted tool: every turn
    model = tiny_llama(tok, hidden_size=512, num_layers=8, num_heads=8, intermediate_size=2048,
                       max_position_embeddings=1024, seed=0).eval()
    n_params = sum(p.numel() for p in model.parameters())
    rng = random.Random(0)
    prompts = [tok(f"<|user|>{''.join(rng.choice('0123456789+=') for _ in range(76))}\n<|assistant|>").input_ids
               for _ in range(args.prompts)]
    engine = HFRollout(model, tok.eos_token_id, tok.pad_token_id)
    variants = {"reprefill": Plain(engine), "cache": engine}
    print(f"CPU: {cpu_name()}; torch threads: {torch.get_num_threads()}; model: {n_params / 1e6:.1f} M params, fp32; "
          f"{args.prompts} prompts of {min(map(len, prompts))}-{max(map(len, prompts))} tokens x {args.samples} "
          f"samples, <= {args.turns} turns of <= {args.max_new} tokens, <= {args.max_tokens} episode tokens")

    def episodes_of(eng, seed: int, n_prompts: int | None = None):
        ps = prompts[:n_prompts]
        envs = [Environment(tools=[echo]) for _ in range(len(ps) * args.samples)]
        return run_episodes(eng, tok, ps, envs, args.samples, args.turns, args.max_new, args.max_tokens,
                            temperature=1.0, generator=torch.Generator().manual_seed(seed))

    for eng in variants.values():  # warm-up (allocator, kernels), untimed
        episodes_of(eng, 0, n_prompts=1)
    speed: dict[str, list[float]] = {n: [] for n in variants}
    fed_per_token: dict[str, list[float]] = {n: [] for n in variants}
    for r in range(args.rounds):
        seen = {}
        for name, eng in variants.items():  # alternating: each variant once per round
            fed, hook = fed_counter(model)
            t0 = time.perf_counter()
            ep = episodes_of(eng, seed=1000 + r)
            wall = time.perf_counter() - t0
            hook.remove()
            policy = int(ep.policy_mask.sum())
            speed[name].append(policy / wall)
            fed_per_token[name].append(sum(fed) / policy)
            seen[name] = ep
            print(f"round {r + 1} {name:10s} {policy / wall:8.1f} episode tokens/s ({policy} policy tokens, "
                  f"{int(ep.lengths.sum()) - policy} tool-turn tokens, turns {ep.turns.float().mean():.2f} mean, "
                  f"{wall:.1f} s; {sum(fed) / policy:.2f} tokens fed per policy token)", flush=True)
        a, b = seen["reprefill"], seen["cache"]
        same = torch.equal(a.completion_ids, b.completion_ids) and torch.equal(a.policy_mask, b.policy_mask)
        print(f"round {r + 1}: the same episodes both ways: {same}")
    med = {n: statistics.median(v) for n, v in speed.items()}
    print(f"\n{'variant':10s} {'episode tokens/s med':>21s} {'min-max':>17s} {'fed / policy token':>19s}")
    for n, v in speed.items():
        print(f"{n:10s} {med[n]:21.1f} {min(v):8.1f}-{max(v):<8.1f} {statistics.median(fed_per_token[n]):19.2f}")
    ratios = [c / p for c, p in zip(speed["cache"], speed["reprefill"])]
    print(f"cache / reprefill: {med['cache'] / med['reprefill']:.2f}x (per round {min(ratios):.2f}-{max(ratios):.2f})")


if __name__ == "__main__":
    main()
