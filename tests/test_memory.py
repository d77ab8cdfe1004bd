"""Memory bounded by a micro-batch, not by the step: the chunked LM head (values and gradients equal the plain
log-softmax's, and no tensor as large as the batch's logits is ever made), RLVR's micro-batches (the accumulated
gradient equals the whole step's), and the HF engine's bounded sampling batch."""

from __future__ import annotations

import lightning as L
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import genlight.models.lm as lm_models
from genlight.models.lm import head_logps
from genlight.models.logps import completion_logps, labelled_logps, token_logps
from tests.helpers import RLVR_RUN, train_with
from tests.helpers.checkpoints import bpe_tokenizer, tiny_config


class Head(torch.nn.Module):
    """A bare LM head (what `head_logps` reads): untied, with a bias."""

    def __init__(self, h: int, v: int):
        super().__init__()
        self.config = type("C", (), {"tie_word_embeddings": False})()
        self.lm_head = torch.nn.Linear(h, v, bias=True)

    def get_output_embeddings(self):
        return self.lm_head


def _plain(head: Head, hidden, targets, temperature):
    logits = head.lm_head(hidden.float()) / temperature
    logp_all = torch.log_softmax(logits, -1)
    return logp_all.gather(-1, targets[:, None]).squeeze(-1), -(logp_all.exp() * logp_all).sum(-1), logits.argmax(-1)


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_head_logps_equal_the_plain_log_softmax_in_values_and_gradients(temperature):
    """Log-probs, entropies and greedy tokens as the full softmax gives them; the gradients of the log-probs and of the
    entropies (together and alone) as autograd through the full logits gives them."""
    torch.manual_seed(0)
    head = Head(16, 50)
    hidden = torch.randn(37, 16, requires_grad=True)
    targets = torch.randint(0, 50, (37,))
    upstream = torch.randn(37)  # a weighted sum, so each position's gradient is checked, not only their total
    want, want_ent, want_arg = _plain(head, hidden, targets, temperature)
    want_grads = torch.autograd.grad((want * upstream).sum(), [hidden, *head.parameters()])
    # 50 * 8 elements: 8 positions a chunk, 5 chunks (the last one short)
    got, ent, arg = head_logps(head, hidden, targets, temperature, entropy=True, argmax=True, chunk_elements=400)
    grads = torch.autograd.grad((got * upstream).sum(), [hidden, *head.parameters()])
    assert torch.allclose(got, want, atol=1e-5) and torch.allclose(ent, want_ent, atol=1e-5)
    assert torch.equal(arg, want_arg)
    for g, w, name in zip(grads, want_grads, ["hidden", "weight", "bias"]):
        assert torch.allclose(g, w, atol=1e-5), name
    # the entropy's gradient (algo.entropy_coef), with the log-probs' and alone: dH/dlogits = -p (log p + H)
    up_ent = torch.randn(37)
    for use_logp in (True, False):
        want, want_ent, _ = _plain(head, hidden, targets, temperature)
        w_obj = (want_ent * up_ent).sum() + ((want * upstream).sum() if use_logp else 0)
        want_grads = torch.autograd.grad(w_obj, [hidden, *head.parameters()])
        got, ent, _ = head_logps(head, hidden, targets, temperature, entropy=True, chunk_elements=400)
        obj = (ent * up_ent).sum() + ((got * upstream).sum() if use_logp else 0)
        grads = torch.autograd.grad(obj, [hidden, *head.parameters()])
        for g, w, name in zip(grads, want_grads, ["hidden", "weight", "bias"]):
            assert torch.allclose(g, w, atol=1e-5), (name, use_logp)


class LargestFloat(TorchDispatchMode):
    """The largest floating-point tensor any operation produces while active (forward and backward)."""

    def __init__(self):
        super().__init__()
        self.numel = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, tuple | list) else [out]:
            if isinstance(t, torch.Tensor) and t.is_floating_point():
                self.numel = max(self.numel, t.numel())
        return out


def test_head_logps_never_makes_the_batch_logits():
    """512 positions x 2000 rows of vocabulary: no tensor reaches 512 x 2000 elements in the forward or the backward
    (the plain computation makes several); the largest is a chunk's logits or the weight's gradient."""
    torch.manual_seed(0)
    head = Head(8, 2000)
    hidden = torch.randn(512, 8, requires_grad=True)
    targets = torch.randint(0, 2000, (512,))
    with LargestFloat() as seen:
        logp = head_logps(head, hidden, targets, chunk_elements=32 * 2000)[0]
        logp.sum().backward()
    assert seen.numel <= 32 * 2000, seen.numel
    with LargestFloat() as plain:
        _plain(head, hidden, targets, 1.0)[0].sum().backward()
    assert plain.numel >= 512 * 2000  # the measure sees the plain logits: it can fail


@pytest.mark.parametrize("arch", ["llama", "qwen2", "gpt2"])  # untied head; tied (Qwen2, GPT-2)
def test_chunked_log_probs_and_gradients_equal_the_full_logits_on_real_architectures(arch, monkeypatch):
    """`labelled_logps` (SFT, DPO rows) and `completion_logps` (RLVR, shared prompts) with the head forced into
    chunks of a few tokens equal `token_logps` of the model's own full logits, with the same parameter gradients."""
    tok = bpe_tokenizer()
    cls, config = tiny_config(arch, tok)
    torch.manual_seed(0)
    model = cls(config)
    assert model.config.tie_word_embeddings == (arch != "llama")
    rows = [tok(t)["input_ids"] for t in ["12+30=42", "7+5=12<|im_end|>", "99+1=100"]]
    width = max(map(len, rows))
    ids = torch.tensor([r + [tok.pad_token_id] * (width - len(r)) for r in rows])
    mask = torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in rows])
    labels = ids.masked_fill(mask == 0, -100)
    labels[:, :2] = -100  # a prompt: not scored

    def grads(loss):
        model.zero_grad()
        loss.backward()
        return [p.grad.clone() for p in model.parameters() if p.grad is not None]

    want, want_mask = token_logps(model(input_ids=ids, attention_mask=mask).logits, labels)
    want_g = grads(want.sum())
    monkeypatch.setattr(lm_models, "LOGITS_CHUNK_ELEMENTS", 3 * config.vocab_size)  # 3 tokens a chunk
    got, got_mask, _ = labelled_logps(model, ids, labels, mask)
    assert torch.equal(got_mask, want_mask) and torch.allclose(got, want, atol=1e-5)
    assert all(torch.allclose(a, b, atol=1e-5) for a, b in zip(grads(got.sum()), want_g))

    # shared-prompt encoding (G = 2 completions per prompt) against each sample's full forward
    prompt, pmask = ids[:2, :3], mask[:2, :3]
    comp = torch.tensor([[5, 6, 7], [8, 9, 0], [10, 11, 12], [13, 0, 0]])
    cmask = torch.tensor([[1, 1, 1], [1, 1, 0], [1, 1, 1], [1, 0, 0]], dtype=torch.bool)
    got, _ = completion_logps(model, prompt, pmask, comp, cmask, 0.8, group=2)
    full = torch.cat([prompt.repeat_interleave(2, 0), comp], 1)
    monkeypatch.setattr(lm_models, "LOGITS_CHUNK_ELEMENTS", 2**30)
    logits = model(input_ids=full, attention_mask=torch.cat([pmask.repeat_interleave(2, 0), cmask.long()], 1)).logits
    want = torch.log_softmax(logits[:, 2:-1].float() / 0.8, -1).gather(-1, comp[..., None]).squeeze(-1) * cmask
    assert torch.allclose(got, want, atol=1e-5)


# ----------------------------------------------------------------------------- RLVR micro-batches
class Grads(L.Callback):
    """The gradient of every trained parameter just before each optimizer step."""

    def __init__(self):
        self.by_step: dict[int, dict[str, torch.Tensor]] = {}

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        self.by_step[trainer.global_step] = {n: p.grad.clone() for n, p in pl_module.model.named_parameters()
                                             if p.grad is not None}


# 3 steps without validation; the lagged generator (refreshed at step 3) makes rho != 1 at steps 2-3, and beta > 0
# with pi_ref = pi_0 makes the KL gradient non-zero from step 2 on. No clipping: it would hide a gradient's scale.
MICRO_RUN = [o for o in RLVR_RUN if not o.startswith("trainer.val_check_interval")] + [
    "trainer.max_steps=3", "+trainer.limit_val_batches=0", "trainer.num_sanity_val_steps=0", "trainer.gradient_clip_val=null",
    "algo.beta=0.1", "algo.max_new_tokens=5"]


@pytest.mark.parametrize("loss_type", ["cispo", "grpo"])
@pytest.mark.parametrize("loss_agg", ["prompt", "token", "sequence"])
def test_micro_batch_losses_sum_to_the_step_loss(loss_type, loss_agg):
    """`rlvr_loss` on ranges of samples with the step's `token_weights` and denominator sums, in value and gradient,
    to `rlvr_loss` of the whole (B, G, T) step (the aggregation the hand-computation tests check), KL term included."""
    from genlight.rl.loss import count_units, loss_groups, rlvr_loss, token_weights

    torch.manual_seed(0)
    b, g, t = 3, 4, 5
    logp = (-torch.rand(b, g, t) * 3).requires_grad_(True)
    logp_gen, ref = logp.detach() + 0.3 * torch.randn(b, g, t), logp.detach() + 0.2 * torch.randn(b, g, t)
    mask = torch.rand(b, g, t) > 0.3
    adv, keep = torch.randn(b, g), torch.tensor([True, False, True])
    kw = dict(loss_type=loss_type, loss_agg=loss_agg, beta=0.1, clip_high=0.2)
    want, _ = rlvr_loss(logp, logp_gen, adv, mask, keep, **kw, ref_logp=ref)
    (want_g,) = torch.autograd.grad(want, logp)
    # as the module: the KL term holds for every group (`loss_groups`), the filtered group's advantages are 0
    groups = loss_groups(keep, 0.1, "loss")
    weights, n = token_weights(mask, groups, loss_agg).flatten(0, 1), count_units(mask, groups, loss_agg)
    flat = lambda x: x.flatten(0, 1)  # noqa: E731
    parts = [rlvr_loss(flat(logp)[s:e], flat(logp_gen)[s:e], (adv * keep[:, None]).flatten()[s:e], flat(mask)[s:e], None, **kw,
                       ref_logp=flat(ref)[s:e], normalizer=n, weights=weights[s:e], with_stats=False)[0]
             for s, e in [(0, 3), (3, 7), (7, 12)]]  # ranges that split groups
    got = sum(parts)
    (got_g,) = torch.autograd.grad(got, logp)
    assert got.item() == pytest.approx(want.item(), rel=1e-6) and torch.allclose(got_g, want_g, atol=1e-7)
    assert want.abs().item() > 1e-3


def _step_grads(cfg_factory, *overrides) -> dict:
    rec = Grads()
    train_with(cfg_factory(*MICRO_RUN, *overrides), rec)
    return rec.by_step


def _same(a: dict, b: dict) -> None:
    assert sorted(a) == sorted(b) == [0, 1, 2]
    for step in a:
        for name, g in a[step].items():
            assert torch.allclose(g, b[step][name], rtol=1e-4, atol=1e-6), f"step {step}: {name}"
        assert max(float(g.abs().max()) for g in a[step].values()) > 0, "zero gradient: the check is vacuous"


@pytest.mark.parametrize("loss_type", ["cispo", "grpo", "dapo"])
@pytest.mark.parametrize("loss_agg", ["prompt", "token", "sequence"])
def test_rlvr_micro_batches_accumulate_the_whole_step_gradient(cfg_factory, loss_type, loss_agg):
    """4 prompts x G = 4 samples a step, in micro-batches of 3 samples (groups split across micro-batches) or of
    a token budget: the gradient before each optimizer step equals the one-micro-batch step's."""
    agg = [f"algo.loss_type={loss_type}", f"algo.loss_agg={loss_agg}"]
    whole = _step_grads(cfg_factory, *agg)
    _same(whole, _step_grads(cfg_factory, *agg, "algo.micro_batch_size=3"))
    if loss_type == "cispo":  # the token budget: micro-batches of varying sample counts
        _same(whole, _step_grads(cfg_factory, *agg, "algo.max_tokens_per_micro_batch=40"))


def test_rlvr_micro_batches_under_lora(cfg_factory):
    lora = ["model.lora.r=4", "model.lora.dropout=0.0"]
    _same(_step_grads(cfg_factory, *lora), _step_grads(cfg_factory, *lora, "algo.micro_batch_size=5"))


class GradProjection(L.Callback):
    """Logs each step's gradient as two numbers (a fixed random projection and the norm), so that runs in forked DDP
    workers can be compared through their returned metrics."""

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        grads = [p.grad.flatten() for p in pl_module.model.parameters() if p.grad is not None]
        g = torch.cat(grads).double()
        proj = torch.randn(g.numel(), generator=torch.Generator().manual_seed(0), dtype=torch.float64)
        pl_module.log(f"grad/proj_{trainer.global_step}", (g @ proj).float(), batch_size=1, on_step=True)
        pl_module.log(f"grad/norm_{trainer.global_step}", g.norm().float(), batch_size=1, on_step=True)


def test_rlvr_micro_batches_under_ddp(cfg_factory):
    """2 processes x 2 prompts x G = 4: micro-batches of 3 samples give the gradient of the one-micro-batch step on
    each rank (after DDP's average: every rank calls backward as often, and the denominators are global)."""
    ddp = ["trainer=ddp", "trainer.strategy=ddp_fork", "data.batch_size=2"]
    whole, _ = train_with(cfg_factory(*MICRO_RUN, *ddp), GradProjection())
    keys = [k for k in whole if k.startswith("grad/")]
    assert len(keys) == 6 and float(whole["grad/norm_2"]) > 0
    # a token budget plans each rank's micro-batches from its own lengths; the ranks then even out their counts
    for option in ["algo.micro_batch_size=3", "algo.max_tokens_per_micro_batch=30"]:
        micro, _ = train_with(cfg_factory(*MICRO_RUN, *ddp, option), GradProjection())
        for k in keys:
            assert float(micro[k]) == pytest.approx(float(whole[k]), rel=1e-4, abs=1e-6), f"{option}: {k}"


def test_rlvr_micro_batch_plan_fits_the_budget_and_refuses_what_cannot_fit(cfg_factory):
    import hydra

    cfg = cfg_factory(*MICRO_RUN, "algo.micro_batch_size=3", "algo.max_tokens_per_micro_batch=30")
    tok = hydra.utils.instantiate(cfg.model.tokenizer)
    from genlight.rl.rollouts import plan
    from tests.helpers import attach_trainer

    module = attach_trainer(hydra.utils.instantiate(cfg.algo, net=hydra.utils.instantiate(cfg.model.net), tokenizer=tok))
    prompt_mask = torch.tensor([[0, 1, 1, 1], [1, 1, 1, 1]])  # 3 and 4 prompt tokens; G = 4
    lengths = torch.tensor([5, 1, 2, 5, 1, 5, 1, 1])
    hp = module.hparams
    ranges = plan(module, prompt_mask, lengths, 4, hp.micro_batch_size, hp.max_tokens_per_micro_batch)
    assert ranges[0][0] == 0 and ranges[-1][1] == 8 and all(a[1] == b[0] for a, b in zip(ranges, ranges[1:]))
    for s, e in ranges:
        assert e - s <= 3
        assert (e - s) * (int(prompt_mask.sum(-1).repeat_interleave(4)[s:e].max()) + int(lengths[s:e].max())) <= 30
    assert ranges == [(0, 3), (3, 6), (6, 8)]
    # samples 0 and 3 are 3 + 5 = 8 tokens; sample 5 is 4 + 5 = 9
    with pytest.raises(ValueError, match=r"algo.max_tokens_per_micro_batch=8 cannot hold sample 5 .*4 prompt \+ 5"):
        plan(module, prompt_mask, lengths, 4, hp.micro_batch_size, 8)
    # what a bad key raises: from the config before any work (the recipe), or at instantiation, its message kept
    from hydra.errors import InstantiationException

    with pytest.raises(ValueError, match="algo.micro_batch_size=0: must be >= 1"):
        train_with(cfg_factory(*MICRO_RUN, "algo.micro_batch_size=0"))
    with pytest.raises(InstantiationException, match=r"algo.max_tokens_per_micro_batch=4 cannot hold one sample"):
        train_with(cfg_factory(*MICRO_RUN, "algo.max_tokens_per_micro_batch=4"))
    with pytest.raises(ValueError,
                       match=r"accumulate_grad_batches=2: RLVRModule takes one optimizer step .*micro_batch_size"):
        train_with(cfg_factory(*MICRO_RUN, "trainer.accumulate_grad_batches=2"))


# ----------------------------------------------------------------------------- bounded generation
def test_hf_engine_samples_at_most_max_batch_size_sequences_at_once(tokenizer):
    """12 samples (3 prompts x 4) with max_batch_size 5: no forward pass sees more than 5 rows (groups are split
    across pieces), and with top_p that keeps only the most likely token the pieces produce what one batch does."""
    from genlight.models import tiny_llama
    from genlight.models.rollout import HFRollout

    model = tiny_llama(tokenizer, hidden_size=32, num_layers=1, num_heads=2, intermediate_size=64)
    enc = tokenizer(["1+2=", "33+4=", "5+60="], padding=True, return_tensors="pt")
    ids, mask = enc["input_ids"], enc["attention_mask"]
    rows = []
    model.model.register_forward_hook(lambda m, args, kw, out: rows.append(kw["input_ids"].size(0)), with_kwargs=True)
    whole = HFRollout(model, tokenizer.eos_token_id, tokenizer.pad_token_id).generate(ids, mask, 4, 6, 0.9, 1e-6)
    assert max(rows) == 12
    rows.clear()
    pieces = HFRollout(model, tokenizer.eos_token_id, tokenizer.pad_token_id, max_batch_size=5).generate(
        ids, mask, 4, 6, 0.9, 1e-6)
    assert max(rows) == 5 and min(rows) < 5
    assert torch.equal(pieces.completion_ids, whole.completion_ids)
    assert torch.equal(pieces.completion_mask, whole.completion_mask)
    assert torch.allclose(pieces.logps, whole.logps, atol=1e-5) and torch.equal(pieces.truncated, whole.truncated)
    with pytest.raises(ValueError, match="rollout.max_batch_size=0"):
        HFRollout(model, tokenizer.eos_token_id, tokenizer.pad_token_id, max_batch_size=0)


def test_the_micro_batch_planner_by_hand():
    """`genlight.rl.planner`: greedy consecutive ranges within the padded-token budget (samples x (longest prompt + longest
    completion)); evened out by splitting the largest; a sample over the budget alone is named."""
    from genlight.rl.planner import even_out, plan_micro_batches

    prompt, completion = [3, 3, 3, 3], [1, 5, 2, 2]
    # (0, 2): 2 x (3 + 5) = 16 fits 16, (0, 3) = 24 does not; (2, 4): 2 x (3 + 2) = 10
    assert plan_micro_batches(prompt, completion, None, 16) == [(0, 2), (2, 4)]
    assert plan_micro_batches(prompt, completion, 1, None) == [(0, 1), (1, 2), (2, 3), (3, 4)]
    assert plan_micro_batches(prompt, completion, None, None) == [(0, 4)]
    assert even_out([(0, 2), (2, 4)], 3, prompt, completion) == [(0, 1), (1, 2), (2, 4)]  # 16 > 10: split the first
    with pytest.raises(ValueError, match="cannot hold sample 1 of this step: 3 prompt \\+ 5 completion tokens"):
        plan_micro_batches(prompt, completion, None, 7)
