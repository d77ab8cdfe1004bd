"""Log-probabilities of completions under a causal LM, the kernels every algorithm and the rollout engines score with:
the LM head runs in float32 and in chunks (`genlight.models.lm.head_logps`) only at the positions that are scored; a prompt
shared by several completions is encoded once (its KV cache repeated); packed prompt trees get their 4-D mask."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from transformers import DynamicCache

from genlight.models.lm import cache_kwarg, causal_lm, head_logps, position_ids


def token_logps(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """log pi(y_t | y_<t) of each next token, in float32, and the mask of scored tokens.

    `logits[:, t]` predicts `labels[:, t + 1]`; labels = -100 (prompt, padding) are not scored.
    """
    logits, targets = logits[:, :-1].float(), labels[:, 1:]
    mask = targets != -100
    logp = torch.log_softmax(logits, dim=-1)
    picked = logp.gather(-1, targets.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    return picked * mask, mask


def labelled_logps(model, input_ids: torch.Tensor, labels: torch.Tensor, attention_mask: torch.Tensor | None = None,
                   position_ids: torch.Tensor | None = None, argmax: bool = False):
    """`token_logps` from the model itself, with the LM head run only at the scored positions and in chunks
    (`head_logps`: one chunk of float32 logits in memory). Returns the (B, L-1) log-probs (0 where not scored), the
    mask of scored tokens, and with `argmax` the greedy predictions at the scored positions (flat, in order)."""
    hidden = causal_lm(model).base_model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                                         use_cache=False).last_hidden_state
    targets = labels[:, 1:]
    mask = targets != -100
    logp, _, pred = head_logps(model, hidden[:, :-1][mask], targets[mask], argmax=argmax)
    return torch.zeros(mask.shape, dtype=logp.dtype, device=logp.device).masked_scatter(mask, logp), mask, pred


def masked_nll(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean next-token cross-entropy over the scored (completion) tokens, and their count, from given logits (the
    plain formula: the benches' bare loops and the tests' reference; training uses `labelled_logps`)."""
    targets = labels[:, 1:]
    n = (targets != -100).sum()
    loss = F.cross_entropy(
        logits[:, :-1].float().reshape(-1, logits.size(-1)), targets.reshape(-1), ignore_index=-100, reduction="sum"
    )
    return loss / n.clamp(min=1), n


def completion_hidden(model, prompt_ids, prompt_mask, completion_ids, completion_mask, group: int = 1) -> torch.Tensor:
    """The last hidden states (N, T, H) at the positions that predict each completion token y_0 .. y_{T-1} (before the
    LM head), with `completion_logps`'s inputs: left-padded prompts, right-padded completions, each prompt encoded once
    for its `group` completions (prompt-major)."""
    lm = causal_lm(model)
    if group > 1 and lm.is_gradient_checkpointing and lm.training and torch.is_grad_enabled():
        # transformers drops the KV cache under gradient checkpointing: encode each prompt once per completion
        prompt_ids, prompt_mask = prompt_ids.repeat_interleave(group, 0), prompt_mask.repeat_interleave(group, 0)
        group = 1
    if group == 1:
        ids = torch.cat([prompt_ids, completion_ids], 1)
        mask = torch.cat([prompt_mask.bool(), completion_mask.bool()], 1).long()
        hidden = lm.base_model(input_ids=ids, attention_mask=mask, position_ids=position_ids(mask)).last_hidden_state
        hidden = hidden[:, -completion_ids.size(1) - 1 : -1]  # the positions that predict y_0 .. y_{T-1}
    else:
        kw = {cache_kwarg(model): DynamicCache(config=lm.config)}
        out = lm.base_model(input_ids=prompt_ids, attention_mask=prompt_mask, position_ids=position_ids(prompt_mask),
                               use_cache=True, **kw)
        hidden = out.last_hidden_state[:, -1:].repeat_interleave(group, 0)  # predicts y_0
        if completion_ids.size(1) > 1:
            kw[cache_kwarg(model)].batch_repeat_interleave(group)
            mask = torch.cat([prompt_mask.repeat_interleave(group, 0).bool(), completion_mask.bool()], 1).long()
            p = prompt_ids.size(1)
            rest = lm.base_model(input_ids=completion_ids[:, :-1], attention_mask=mask[:, :-1],
                                    position_ids=position_ids(mask)[:, p:-1], use_cache=True, **kw)
            hidden = torch.cat([hidden, rest.last_hidden_state], 1)  # predicts y_1 .. y_{T-1}
    return hidden


def completion_logps(model, prompt_ids, prompt_mask, completion_ids, completion_mask, temperature: float = 1.0,
                     group: int = 1, with_entropy: bool = True):
    """log pi(y_t | x, y_<t) of each completion token (FP32 LM head, temperature applied), and the
    entropy of pi at each of those positions, with its gradient (None with `with_entropy=False`; 0 at padding). Prompts are
    left-padded, completions right-padded. The LM head runs at the completion tokens only, in chunks.

    With `group` = G > 1, `prompt_ids` holds the B distinct prompts and the completions are their
    B*G samples (prompt-major): each prompt is encoded once and its keys/values are shared by its G
    completions (gradients flow back through the shared cache), instead of G identical copies.
    """
    hidden = completion_hidden(model, prompt_ids, prompt_mask, completion_ids, completion_mask, group)
    m = completion_mask.bool()
    logp, ent, _ = head_logps(model, hidden[m], completion_ids[m], temperature, entropy=with_entropy)
    zeros = torch.zeros(m.shape, dtype=logp.dtype, device=logp.device)
    return zeros.masked_scatter(m, logp), None if ent is None else zeros.masked_scatter(m, ent)


def tree_mask(segment_ids: torch.Tensor, branch_ids: torch.Tensor, attn_implementation: str) -> torch.Tensor:
    """The 4-D attention mask (rows, 1, W, W) of packed prompt trees (`data.packing` for preference pairs): a query
    sees earlier keys of its own segment that are prompt (branch 0) or of its own branch. Boolean (True = attend)
    for SDPA, additive for eager attention; FlashAttention takes no such mask."""
    if attn_implementation not in ("sdpa", "eager"):
        raise ValueError(f"data.packing=true for preference pairs needs a custom attention mask, which "
                         f"attn_implementation={attn_implementation!r} does not take: use sdpa or eager, or data.packing=false")
    w = segment_ids.size(1)
    causal = torch.ones(w, w, dtype=torch.bool, device=segment_ids.device).tril()
    same = segment_ids[:, :, None] == segment_ids[:, None, :]
    branch = (branch_ids[:, None, :] == 0) | (branch_ids[:, :, None] == branch_ids[:, None, :])
    mask = (causal & same & branch)[:, None]
    if attn_implementation == "eager":
        return torch.zeros(mask.shape, device=mask.device).masked_fill_(~mask, torch.finfo(torch.float32).min)
    return mask


def packed_completion_logps(model, batch: dict, n_sequences: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed completion log-probs (FP32 LM head) of the `n_sequences` completions of a packed batch (`pack_pairs`:
    each prompt once, its completions as branches of one segment, no padding inside rows), and their lengths.
    The LM head runs only at the positions that predict a completion token."""
    lm = causal_lm(model)
    mask = tree_mask(batch["segment_ids"], batch["branch_ids"], lm.config._attn_implementation)
    hidden = lm.base_model(input_ids=batch["input_ids"], attention_mask=mask, position_ids=batch["position_ids"],
                           use_cache=False).last_hidden_state
    logp = head_logps(model, hidden.flatten(0, 1)[batch["logp_index"]], batch["logp_target"])[0]
    seq = batch["logp_seq"]
    sums = torch.zeros(n_sequences, dtype=logp.dtype, device=logp.device).index_add(0, seq, logp)
    return sums, torch.bincount(seq, minlength=n_sequences)
