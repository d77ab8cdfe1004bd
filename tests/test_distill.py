"""On-policy distillation's divergence (src/models/divergence.py): the generalized JSD per completion token by hand
and against TRL 1.16 `DistillationTrainer`'s loss and gradient on the same hidden states and heads, for beta 0, 0.5, 1
and a temperature; the teacher gets no gradient; the chunks change nothing; bad input stops naming the key."""

from __future__ import annotations

import math

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from genlight.models.divergence import head_divergence, token_divergence

VOCAB = 50


def _model(hidden: int, seed: int, tie: bool = False) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    cfg = LlamaConfig(hidden_size=hidden, num_hidden_layers=1, num_attention_heads=2, intermediate_size=2 * hidden,
                      vocab_size=VOCAB, tie_word_embeddings=tie)
    return LlamaForCausalLM(cfg)


def test_token_divergence_by_hand():
    """Three tokens, one float at a time: the forward KL, the reverse KL and the beta-mixture JSD."""
    ps, pt = [0.7, 0.2, 0.1], [0.2, 0.5, 0.3]
    log_ps, log_pt = torch.tensor([ps]).log(), torch.tensor([pt]).log()
    fwd = sum(t * math.log(t / s) for s, t in zip(ps, pt))
    rev = sum(s * math.log(s / t) for s, t in zip(ps, pt))
    for beta in (0.3, 0.5):
        m = [beta * t + (1 - beta) * s for s, t in zip(ps, pt)]
        jsd = beta * sum(t * math.log(t / x) for t, x in zip(pt, m)) + (1 - beta) * sum(
            s * math.log(s / x) for s, x in zip(ps, m))
        assert token_divergence(log_ps, log_pt, beta).item() == pytest.approx(jsd, rel=1e-5)
    assert token_divergence(log_ps, log_pt, 0.0).item() == pytest.approx(fwd, rel=1e-5)
    assert token_divergence(log_ps, log_pt, 1.0).item() == pytest.approx(rev, rel=1e-5)
    # the JSD's limits are the KLs' halves' shape: beta -> 0 gives 0 (m -> p_s), never the forward KL itself
    assert token_divergence(log_ps, log_pt, 1e-6).item() == pytest.approx(0.0, abs=1e-4)


@pytest.mark.parametrize("beta", [0.0, 0.1, 0.5, 0.9, 1.0])
@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_loss_and_gradient_equal_trls_distillation_trainer(beta, temperature):
    """The masked token mean of ours against TRL's `_chunked_divergence_loss` (what `DistillationTrainer` minimises):
    the same student / teacher hidden states (B, K, H) and LM heads (a teacher twice as wide, the student's head with
    a bias), loss and the gradient to the student's hidden states and head. Beta 0.1 and 0.9 tell the mixture's sides
    apart (0.5 is symmetric)."""
    from trl.trainer.distillation_trainer import _chunked_divergence_loss

    student, teacher = _model(16, 0), _model(32, 1)
    head = torch.nn.Linear(16, VOCAB, bias=True)
    with torch.no_grad():
        head.weight.copy_(student.lm_head.weight)
        head.bias.uniform_(-1, 1)
    student.lm_head = head
    torch.manual_seed(2)
    b, k = 3, 5
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 0, 0, 0, 0]])
    h_s0, h_t = torch.randn(b, k, 16), torch.randn(b, k, 32)
    w_s, w_t = student.lm_head.weight, teacher.lm_head.weight

    h_s = h_s0.clone().requires_grad_(True)
    trl, _, _ = _chunked_divergence_loss(h_s, h_t, w_s, w_t, mask, beta, temperature=temperature,
                                         student_lm_head_bias=head.bias)
    trl.backward()
    want_h, want_w, want_b = h_s.grad.clone(), w_s.grad.clone(), head.bias.grad.clone()
    w_s.grad = head.bias.grad = None

    h_s = h_s0.clone().requires_grad_(True)
    m = mask.bool()
    ours = head_divergence(student, h_s[m], teacher, h_t[m], beta, temperature).mean()
    ours.backward()
    assert ours.item() == pytest.approx(trl.item(), rel=1e-4, abs=1e-7)  # float32: TRL folds its tiles online
    assert torch.allclose(h_s.grad, want_h, atol=1e-6)
    assert torch.allclose(w_s.grad, want_w, atol=1e-6) and torch.allclose(head.bias.grad, want_b, atol=1e-6)
    assert teacher.lm_head.weight.grad is None  # the teacher gets no gradient
    assert not torch.equal(want_h[m], torch.zeros_like(want_h[m]))


def test_the_chunks_change_nothing_and_the_teacher_stays_frozen():
    """Chunks of 2 positions (chunk_elements = 2 x vocab) against one chunk: the same divergences and gradients.
    Through the models' own forward, every teacher parameter ends without a gradient, tied heads included."""
    student, teacher = _model(16, 0, tie=True), _model(24, 1)
    ids = torch.randint(0, VOCAB, (2, 7))
    h_s = student.model(input_ids=ids).last_hidden_state.flatten(0, 1)
    with torch.no_grad():
        h_t = teacher.model(input_ids=ids).last_hidden_state.flatten(0, 1)
    whole = head_divergence(student, h_s, teacher, h_t, 0.5)
    (g_whole,) = torch.autograd.grad(whole.sum(), student.model.embed_tokens.weight, retain_graph=True)
    parts = head_divergence(student, h_s, teacher, h_t, 0.5, chunk_elements=2 * VOCAB)
    (g_parts,) = torch.autograd.grad(parts.sum(), student.model.embed_tokens.weight)
    assert torch.allclose(whole, parts, atol=1e-6) and torch.allclose(g_whole, g_parts, atol=1e-6)
    assert all(p.grad is None for p in teacher.parameters())
    assert (whole > 0).all()


def test_bad_input_stops_naming_the_key():
    student, teacher = _model(16, 0), _model(16, 1)
    h = torch.randn(4, 16)
    for beta in (-0.1, 1.5):
        with pytest.raises(ValueError, match=r"algo.beta=.*\[0, 1\]"):
            head_divergence(student, h, teacher, h, beta)
    other = LlamaForCausalLM(LlamaConfig(hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                         intermediate_size=32, vocab_size=VOCAB + 1))
    with pytest.raises(ValueError, match=r"teacher.pretrained: the teacher's LM head has 51 rows and the student's 50"):
        head_divergence(student, h, other, h, 0.5)
    capped = _model(16, 2)
    capped.config.final_logit_softcapping = 30.0  # Gemma-2's: logits transformed after the head
    with pytest.raises(ValueError, match="teacher.pretrained: the model's config sets final_logit_softcapping=30.0"):
        head_divergence(student, h, capped, h, 0.5)
