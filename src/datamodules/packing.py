"""Padding-free batches: sequences (SFT) or preference-pair trees (DPO) concatenated into a few rows of at most
`max_tokens` tokens, positions restarting per sequence, so no compute goes to padding (`data.packing=true`)."""

from __future__ import annotations

import heapq

import torch

IGNORE = -100  # the label of a token that has no loss (transformers' and torch's ignore_index)


def balanced_rows(lengths: list[int], capacity: int) -> tuple[list[list[int]], list[int]]:
    """Item indices per row, and each row's used length, in rows of at most `capacity` tokens (or the longest
    item). As few rows as first-fit decreasing needs, as even as longest-first assignment to the least-filled row
    makes them (when that fits), then evened out further by moves and swaps out of the fullest row. The rows are
    stacked into one tensor as wide as the fullest row: the more even, the less padding."""
    capacity = max(capacity, *lengths)
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    rows: list[list[int]] = []
    used: list[int] = []
    for i in order:  # first-fit decreasing: the number of rows
        r = next((r for r, u in enumerate(used) if u + lengths[i] <= capacity), None)
        if r is None:
            rows.append([])
            used.append(0)
            r = len(rows) - 1
        rows[r].append(i)
        used[r] += lengths[i]
    heap = [(0, r) for r in range(len(rows))]  # (used, row): longest first onto the least-filled row
    even: list[list[int]] = [[] for _ in rows]
    for i in order:
        u, r = heapq.heappop(heap)
        even[r].append(i)
        heapq.heappush(heap, (u + lengths[i], r))
    if max(u for u, _ in heap) <= capacity:
        rows, used = even, [u for u, _ in sorted(heap, key=lambda x: x[1])]
    if len(lengths) <= 64:  # quadratic; with many short items the rows are already about even
        _even_out(rows, used, lengths)
    return rows, used


def _even_out(rows: list[list[int]], used: list[int], lengths: list[int]) -> None:
    """In place: repeatedly the move or swap of items between the fullest row and another that lowers the fullest
    row most, while one does."""
    for _ in range(4 * len(lengths)):
        top = max(range(len(rows)), key=used.__getitem__)
        best = None  # (new width of the two rows, item out of top, row, item back or None, tokens moved)
        for i in rows[top]:
            for r in range(len(rows)):
                for j in [None, *rows[r]] if r != top else []:
                    d = lengths[i] - (lengths[j] if j is not None else 0)
                    if d > 0 and (width := max(used[top] - d, used[r] + d)) < used[top]:
                        if best is None or width < best[0]:
                            best = (width, i, r, j, d)
        if best is None:
            return
        _, i, r, j, d = best
        rows[top].remove(i)
        rows[r].append(i)
        if j is not None:
            rows[r].remove(j)
            rows[top].append(j)
        used[top] -= d
        used[r] += d


def pack(prompts: list[list[int]], completions: list[list[int]], max_tokens: int, pad_id: int,
         completion_labels: list[list[int]] | None = None) -> dict[str, torch.Tensor]:
    """Padding-free: the batch's sequences concatenated into rows of at most `max_tokens` (`balanced_rows`; bounded,
    so that a row is not one long sequence whose dense attention mask costs more than the padding it saves),
    positions restarting at 0 for each sequence, no attention mask: transformers reads the restarts in
    `position_ids` and keeps attention within each sequence (a block-diagonal causal mask). Labels are -100
    on prompts (and where `completion_labels` says so), so no loss crosses a boundary; a short row's tail is one more
    masked segment."""
    seqs = [(p + c, [IGNORE] * len(p) + lab) for p, c, lab in zip(prompts, completions, completion_labels or completions)]
    rows, used = balanced_rows([len(s) for s, _ in seqs], max_tokens)
    width = max(used)
    ids, labels, pos = [], [], []
    for row, u in zip(rows, used):
        ids.append(sum((seqs[i][0] for i in row), []) + [pad_id] * (width - u))
        labels.append(sum((seqs[i][1] for i in row), []) + [IGNORE] * (width - u))
        pos.append(sum((list(range(len(seqs[i][0]))) for i in row), []) + list(range(width - u)))
    return {"input_ids": torch.tensor(ids), "labels": torch.tensor(labels), "position_ids": torch.tensor(pos),
            "num_tokens": torch.tensor(sum(used))}


def pack_pairs(prompts: list[list[int]], chosen: list[list[int]], rejected: list[list[int]], max_tokens: int,
               pad_id: int) -> dict[str, torch.Tensor]:
    """Padding-free preference pairs: each pair is one segment `prompt, chosen, rejected` (the prompt once), the
    segments packed into rows of at most `max_tokens` tokens (`balanced_rows`; the collator gives 2 x max_length,
    the longest a pair's tree can be). Positions restart at 0 for each segment, and the rejected completion's
    positions restart after the prompt, as if it followed the prompt directly. The attention pattern (a tree: the prompt causal, each completion on the prompt and on
    itself, never on the other completion or another pair) is given as `segment_ids` and `branch_ids`
    (0 prompt, 1 chosen, 2 rejected; the model builds the mask). The completion tokens to score are listed
    flat: `logp_index` (row * width + the position that predicts the token), `logp_target` (the token) and
    `logp_seq` (its sequence: chosen i is i, rejected i is B + i, as in the padded layout)."""
    b = len(prompts)
    lengths = [len(p) + len(c) + len(r) for p, c, r in zip(prompts, chosen, rejected)]
    rows, used = balanced_rows(lengths, max_tokens)
    width = max(used)
    ids, pos, seg, branch = [[] for _ in rows], [[] for _ in rows], [[] for _ in rows], [[] for _ in rows]
    index, target, seq = [], [], []
    for r, (row, u) in enumerate(zip(rows, used)):
        for s, i in enumerate(row):
            p, c, rj = prompts[i], chosen[i], rejected[i]
            start = r * width + len(ids[r])  # flat index of the segment's first token
            ids[r] += p + c + rj
            pos[r] += [*range(len(p)), *range(len(p), len(p) + len(c)), *range(len(p), len(p) + len(rj))]
            seg[r] += [s] * lengths[i]
            branch[r] += [0] * len(p) + [1] * len(c) + [2] * len(rj)
            last, c0, r0 = start + len(p) - 1, start + len(p), start + len(p) + len(c)  # the last prompt token
            index += [last, *range(c0, c0 + len(c) - 1), last, *range(r0, r0 + len(rj) - 1)]  # predicts both y_0
            target += c + rj
            seq += [i] * len(c) + [b + i] * len(rj)
        tail = width - u  # padding: a segment of its own (causal in itself, so no query row is empty)
        ids[r] += [pad_id] * tail
        pos[r] += range(tail)
        seg[r] += [len(row)] * tail
        branch[r] += [0] * tail
    return {"input_ids": torch.tensor(ids), "position_ids": torch.tensor(pos), "segment_ids": torch.tensor(seg),
            "branch_ids": torch.tensor(branch), "logp_index": torch.tensor(index), "logp_target": torch.tensor(target),
            "logp_seq": torch.tensor(seq), "num_tokens": torch.tensor(sum(used))}
