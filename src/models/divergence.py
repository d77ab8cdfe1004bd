"""The divergence of on-policy distillation between a student's and a teacher's next-token distributions, per
completion token, from the two models' hidden states through their LM heads in float32 and in chunks of positions
(the heads' full (tokens x vocabulary) logits are never held: at a 151,936-row vocabulary they are the cost).

The generalized Jensen-Shannon divergence of GKD (Agarwal et al. 2024, "On-Policy Distillation of Language Models"),
with p_s, p_t the student's and teacher's distributions at temperature tau (softmax(logits / tau)):

    beta = 0        KL(p_t || p_s) = sum_v p_t (log p_t - log p_s)               forward KL (mode covering)
    beta = 1        KL(p_s || p_t) = sum_v p_s (log p_s - log p_t)               reverse KL (mode seeking)
    0 < beta < 1    beta KL(p_t || m) + (1 - beta) KL(p_s || m),  m = beta p_t + (1 - beta) p_s    (beta = 0.5: JSD)

as TRL's `DistillationTrainer` (its `beta`, `temperature`; tested against its loss and gradient). The gradient
reaches the student's hidden states and LM head only; the teacher's side runs without one.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from genlight.models.lm import LOGITS_CHUNK_ELEMENTS, _head_weights, _sharded_head, causal_lm


def check_beta(beta: float) -> float:
    if not 0.0 <= beta <= 1.0:
        raise ValueError(f"algo.beta={beta}: the generalized JSD interpolates between the forward KL (0) and the reverse "
                         "KL (1); it must be in [0, 1]")
    return float(beta)


def token_divergence(log_ps: torch.Tensor, log_pt: torch.Tensor, beta: float) -> torch.Tensor:
    """The generalized JSD of each row (N, V) of log-probabilities: (N,)."""
    if beta == 0.0:
        return (log_pt.exp() * (log_pt - log_ps)).sum(-1)
    if beta == 1.0:
        return (log_ps.exp() * (log_ps - log_pt)).sum(-1)
    log_m = torch.logaddexp(log_ps + math.log(1 - beta), log_pt + math.log(beta))
    return (beta * log_pt.exp() * (log_pt - log_m) + (1 - beta) * log_ps.exp() * (log_ps - log_m)).sum(-1)


# config keys by which some architectures transform their logits after the head (Cohere, Gemma-2, Granite, ...): the
# divergence reads the head's weights itself, so a model that sets one is refused rather than scored without it
LOGIT_TRANSFORMS = {"logit_scale": 1.0, "final_logit_softcapping": None, "logits_scaling": 1.0,
                    "output_multiplier": 1.0, "lm_head_multiplier": 1.0}


def check_plain_logits(model, key: str) -> None:
    cfg = causal_lm(model).config
    for name, neutral in LOGIT_TRANSFORMS.items():
        value = getattr(cfg, name, neutral)
        if value is not None and value != neutral:
            raise ValueError(f"{key}: the model's config sets {name}={value} (its logits are transformed after the LM "
                             "head), which the distillation divergence does not apply: not supported")


def _chunk(h_s, w_s, b_s, h_t, w_t, b_t, beta: float, temperature: float) -> tuple[torch.Tensor, torch.Tensor]:
    log_ps = F.log_softmax(F.linear(h_s.float(), w_s, b_s) / temperature, -1)
    with torch.no_grad():
        log_pt = F.log_softmax(F.linear(h_t.float(), w_t, b_t) / temperature, -1)
        entropy = -(log_ps.exp() * log_ps).sum(-1)  # the student's, at the temperature (TRL's `entropy`)
    return token_divergence(log_ps, log_pt, beta), entropy


def head_divergence(student, h_s: torch.Tensor, teacher, h_t: torch.Tensor, beta: float, temperature: float = 1.0,
                    chunk_elements: int | None = None, with_entropy: bool = False):
    """The divergence (`token_divergence`) at each position of the student's hidden states `h_s` (N, H_s) and the
    teacher's `h_t` (N, H_t) at the same positions, through each model's own LM head (their widths may differ, their
    vocabularies may not): (N,), with the gradient to `h_s` and the student's head. Positions are taken in chunks of
    at most `chunk_elements` logits (default `LOGITS_CHUNK_ELEMENTS`), each recomputed in the backward, so memory
    holds one chunk of both models' float32 logits, never the batch's. With `with_entropy`: also the student's
    entropy at each position (N,), without gradient."""
    check_beta(beta)
    if temperature <= 0:
        raise ValueError(f"algo.temperature={temperature}: must be > 0")
    if _sharded_head(student) is not None or _sharded_head(teacher) is not None:
        raise ValueError("the distillation divergence reads the LM heads' weights whole: an LM head sharded as its own "
                         "FSDP2 unit is not supported (use DDP, or tie the embeddings)")
    check_plain_logits(student, "model")
    check_plain_logits(teacher, "teacher.pretrained")
    w_s, b_s = _head_weights(student)
    w_t, b_t = _head_weights(teacher)
    if w_s.size(0) != w_t.size(0):
        raise ValueError(f"teacher.pretrained: the teacher's LM head has {w_t.size(0)} rows and the student's "
                         f"{w_s.size(0)}: distillation compares their next-token distributions over the same rows, so "
                         "their vocabularies must match row for row (a shared tokenizer padded to other sizes does not)")
    # float32 once, outside the chunks: a low-precision weight's gradient then sums over the chunks in float32 and is
    # cast back once (a cast per chunk would round each chunk's share)
    w_s, w_t = w_s.float(), w_t.float()
    b_s, b_t = (None if b is None else b.float() for b in (b_s, b_t))
    n = h_s.size(0)
    if n == 0:
        empty = h_s.new_zeros(0, dtype=torch.float32)
        return (empty, empty) if with_entropy else empty
    rows = max(1, (chunk_elements or LOGITS_CHUNK_ELEMENTS) // w_s.size(0))
    h_t = h_t.detach()
    with torch.autocast(h_s.device.type, enabled=False):
        parts = [checkpoint(_chunk, h_s[s : s + rows], w_s, b_s, h_t[s : s + rows], w_t, b_t, beta, temperature,
                            use_reentrant=False) if torch.is_grad_enabled() and (h_s.requires_grad or w_s.requires_grad)
                 else _chunk(h_s[s : s + rows], w_s, b_s, h_t[s : s + rows], w_t, b_t, beta, temperature)
                 for s in range(0, n, rows)]
    div, entropy = torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])
    return (div, entropy.detach()) if with_entropy else div

