"""The micro-batch planner of an RL step (verl's dynamic batch size): which consecutive samples train together, so
that memory grows with a micro-batch, not with the step's prompts x G samples. Pure Python: no Lightning.

A micro-batch's padded size is samples x (longest prompt + longest completion) among them; the step's token weights
and loss denominator are counted over the whole step elsewhere (`genlight.rl.loss.token_weights`), so the micro-batches'
gradients sum to the step's.
"""

from __future__ import annotations


def padded_size(prompt_len: list[int], comp_len: list[int], s: int, e: int) -> int:
    """Tokens of samples [s, e) padded to their longest prompt + longest completion."""
    return (e - s) * (max(prompt_len[s:e]) + max(comp_len[s:e]))


def plan_micro_batches(prompt_len: list[int], comp_len: list[int], cap: int | None = None,
                       budget: int | None = None) -> list[tuple[int, int]]:
    """Consecutive sample ranges [s, e), greedily as long as possible: at most `cap` samples (`algo.micro_batch_size`;
    None: no bound) whose padded size fits `budget` tokens (`algo.max_tokens_per_micro_batch`; None: no bound). A
    sample that alone exceeds the budget is an error naming it."""
    n = len(comp_len)
    cap = cap or n
    ranges, s = [], 0
    while s < n:
        e = s + 1
        if budget is not None and padded_size(prompt_len, comp_len, s, e) > budget:
            raise ValueError(f"algo.max_tokens_per_micro_batch={budget} cannot hold sample {s} of this step: "
                             f"{prompt_len[s]} prompt + {comp_len[s]} completion tokens")
        while e < n and e - s < cap and (budget is None or padded_size(prompt_len, comp_len, s, e + 1) <= budget):
            e += 1
        ranges.append((s, e))
        s = e
    return ranges


def even_out(ranges: list[tuple[int, int]], count: int, prompt_len: list[int],
             comp_len: list[int]) -> list[tuple[int, int]]:
    """`ranges` split until there are `count` of them (the most any process plans: under DDP and FSDP2 each forward
    and backward is collective, so every process runs as many): the largest splittable range in two, each half still
    fitting what the whole did."""
    ranges = list(ranges)
    while len(ranges) < count:
        i = max(range(len(ranges)),
                key=lambda j: padded_size(prompt_len, comp_len, *ranges[j]) if ranges[j][1] - ranges[j][0] > 1 else -1)
        s, e = ranges[i]
        ranges[i : i + 1] = [(s, (s + e) // 2), ((s + e) // 2, e)]
    return ranges
