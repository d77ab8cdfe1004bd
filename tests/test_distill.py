"""On-policy distillation's divergence (src/models/divergence.py): the generalized JSD per completion token by hand
and against TRL 1.16 `DistillationTrainer`'s loss and gradient on the same hidden states and heads, for beta 0, 0.5, 1
and a temperature; the teacher gets no gradient; the chunks change nothing; bad input stops naming the key."""

from __future__ import annotations

import math
from pathlib import Path

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


# --------------------------------------------------------------------------- the module: algo=distill
def _distill_cfg(cfg_factory, *overrides, teacher=None):
    from tests.helpers import TEACHER

    return cfg_factory("algo=distill", "warm_start.max_steps=0", f"teacher.pretrained={teacher or TEACHER}",
                       "trainer.enable_progress_bar=false", "test=false", "callbacks=none", *overrides)


def test_a_step_minimises_trls_loss_on_the_rows_completions(cfg_factory):
    """lmbda 0 (GKD's off-policy steps): one step on the rows' own completions. The logged `train/loss` and the
    gradient reaching the student's (tied) embedding equal TRL 1.16's `_chunked_divergence_loss` over every completion
    token of the step, computed here row by row without padding from a fresh copy of the student, for beta 0.5 and a
    temperature. The checkpoint holds no teacher weight."""
    import hydra
    from trl.trainer.distillation_trainer import _chunked_divergence_loss

    from genlight.models.lm import from_pretrained
    from tests.helpers import TEACHER, train_with

    grads = {}

    class Grab(__import__("lightning").Callback):
        def on_before_optimizer_step(self, trainer, module, optimizer):  # before clipping (the module's hook)
            grads["embed"] = module.model.model.embed_tokens.weight.grad.clone()

    cfg = _distill_cfg(cfg_factory, "algo.lmbda=0.0", "algo.beta=0.5", "algo.temperature=2.0", "trainer.max_steps=1",
                       "data.source.n_train=8", "data.batch_size=8", "+trainer.limit_val_batches=0",
                       "algo.max_new_tokens=3")  # the arithmetic answers are 1-4 characters: some are cut
    metrics, objs = train_with(cfg, Grab())
    tok = hydra.utils.instantiate(cfg.model.tokenizer)
    student = hydra.utils.instantiate(cfg.model.net)(tokenizer=tok)  # the weights before the step (the same seed)
    teacher = from_pretrained(tok, str(TEACHER))
    dm = objs["datamodule"]
    h_s, h_t, cut = [], [], 0
    for ex in dm.examples["train"]:
        comp = tok(ex["columns"]["completion"], add_special_tokens=False).input_ids + [tok.eos_token_id]
        cut += len(comp) > 3
        ids = torch.tensor([ex["prompt_ids"] + comp[:3]])
        p, c = len(ex["prompt_ids"]), len(comp[:3])
        h_s.append(student.model(input_ids=ids).last_hidden_state[0, p - 1 : p + c - 1])
        with torch.no_grad():
            h_t.append(teacher.model(input_ids=ids).last_hidden_state[0, p - 1 : p + c - 1])
    assert cut > 0  # the cap was exercised
    h_s, h_t = torch.cat(h_s)[None], torch.cat(h_t)[None]
    want, _, _ = _chunked_divergence_loss(h_s, h_t, student.lm_head.weight, teacher.lm_head.weight,
                                          torch.ones(h_s.shape[:2]), 0.5, temperature=2.0)
    want.backward()
    assert float(metrics["train/loss"]) == pytest.approx(want.item(), rel=1e-4)
    # FLOPs: nothing sampled; the teacher's forward (2 N_t) and the student's training (6 N_s) over every prompt and
    # completion token once
    tokens = sum(len(ex["prompt_ids"]) for ex in dm.examples["train"]) + h_s.size(1)
    n_s, n_t = (sum(p.numel() for p in m.parameters()) for m in (student, teacher))
    assert float(metrics["train/compute_flops"]) == pytest.approx((2 * n_t + 6 * n_s) * tokens, rel=1e-6)
    assert torch.allclose(grads["embed"], student.model.embed_tokens.weight.grad, atol=1e-7, rtol=1e-4)
    assert grads["embed"].abs().sum() > 0
    module = objs["module"]
    ckpt = {"state_dict": module.state_dict()}
    module.on_save_checkpoint(ckpt)
    assert ckpt["state_dict"] and not [k for k in ckpt["state_dict"] if k.startswith("teacher.")]
    module.on_load_checkpoint(ckpt)  # resuming puts the teacher's weights, as loaded, back for the strict load
    assert torch.equal(ckpt["state_dict"]["teacher.lm_head.weight"], module.teacher.lm_head.weight)


def test_the_student_learns_the_teachers_distribution(cfg_factory, tmp_path, tokenizer):
    """On-policy, reverse KL: a confident teacher (a random model whose untied head is scaled x 6) and a student of half
    its width. After 100 steps the mean divergence per token on held-out rows' completions falls below a third of where
    it started, and the student's greedy next token agrees with the teacher's far more often."""
    import hydra

    from genlight.models import tiny_llama
    from genlight.models.divergence import head_divergence
    from tests.helpers import train_with

    teacher = tiny_llama(tokenizer, hidden_size=128, num_layers=2, num_heads=4, intermediate_size=256,
                         tie_word_embeddings=False, seed=3)
    with torch.no_grad():
        teacher.lm_head.weight.mul_(6.0)
    teacher.save_pretrained(tmp_path / "teacher")
    tokenizer.save_pretrained(tmp_path / "teacher")
    cfg = _distill_cfg(cfg_factory, "trainer.max_steps=100", "algo.lr=1e-3", "algo.warmup_steps=0",
                       "model.net.hidden_size=64", "model.net.intermediate_size=128", "data.source.n_train=256",
                       "data.batch_size=32", "algo.num_generations=2", "+trainer.limit_val_batches=0",
                       "data.source.n_val=64", teacher=tmp_path / "teacher")
    tok = hydra.utils.instantiate(cfg.model.tokenizer)
    start = hydra.utils.instantiate(cfg.model.net)(tokenizer=tok)

    def measure(student, module):
        divs, agree, n = 0.0, 0, 0
        for ex in module_dm.examples["val"]:
            comp = tok(ex["columns"]["completion"], add_special_tokens=False).input_ids + [tok.eos_token_id]
            ids = torch.tensor([ex["prompt_ids"] + comp])
            p = len(ex["prompt_ids"])
            with torch.no_grad():
                h_s = student.model(input_ids=ids).last_hidden_state[0, p - 1 : -1]
                h_t = module.teacher.model(input_ids=ids).last_hidden_state[0, p - 1 : -1]
                divs += head_divergence(student, h_s, module.teacher, h_t, 1.0).sum().item()
                agree += (student.lm_head(h_s).argmax(-1) == module.teacher.lm_head(h_t).argmax(-1)).sum().item()
            n += h_s.size(0)
        return divs / n, agree / n

    _, objs = train_with(cfg)
    module_dm, module = objs["datamodule"], objs["module"]
    before, after = measure(start, module), measure(module.model.eval(), module)
    assert after[0] < before[0] / 3, (before, after)
    assert after[1] > before[1] + 0.3, (before, after)


def test_the_compute_counts_what_each_micro_batch_encodes(hf_dir):
    """A micro-batch of whole groups encodes each prompt once for its samples; one that splits a group, once per
    sample (the prompts are 3 and 5 tokens, 2 samples each, completions 2, 1, 4, 3 tokens); so does a model trained
    under gradient checkpointing (no shared cache)."""
    from genlight.models.lm import from_pretrained
    from genlight.models.tokenizer import load_tokenizer
    from genlight.rl.rollouts import encoded_tokens, shares_prompt_cache

    mask = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]])
    lengths = torch.tensor([2, 1, 4, 3])
    assert encoded_tokens(mask, lengths, 2, [(0, 4)]) == 8 + 10
    assert encoded_tokens(mask, lengths, 2, [(0, 2), (2, 4)]) == 8 + 10
    assert encoded_tokens(mask, lengths, 2, [(0, 3), (3, 4)]) == (3 + 3 + 5) + 5 + 10
    assert encoded_tokens(mask, lengths, 2, [(0, 4)], shared_cache=False) == 16 + 10
    model = from_pretrained(load_tokenizer(str(hf_dir)), str(hf_dir)).train()
    assert shares_prompt_cache(model)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    assert not shares_prompt_cache(model) and shares_prompt_cache(model.eval())


def test_lmbda_mixes_the_steps_deterministically(cfg_factory):
    import hydra

    from tests.helpers import REQUIRED_ARGS

    cfg = _distill_cfg(cfg_factory)
    tok = hydra.utils.instantiate(cfg.model.tokenizer)
    from genlight.lightning_modules.distill import DistillModule

    m = DistillModule(hydra.utils.instantiate(cfg.model.net), tok, lmbda=0.3, **REQUIRED_ARGS["distill"])
    picks = [m.on_policy_step(s) for s in range(1000)]
    assert 0.26 < sum(picks) / 1000 < 0.34 and picks == [m.on_policy_step(s) for s in range(1000)]
    m.hparams.seed += 1  # another seed, other steps
    assert picks != [m.on_policy_step(s) for s in range(1000)]
    m.hparams.lmbda = 0.0
    assert not any(m.on_policy_step(s) for s in range(200))
    m.hparams.lmbda = 1.0
    assert all(m.on_policy_step(s) for s in range(200))


def test_bad_teachers_and_options_stop_before_work(cfg_factory, tmp_path, tokenizer):
    import hydra
    from transformers import PreTrainedTokenizerFast

    from genlight.lightning_modules.distill import DistillModule
    from genlight.models import tiny_llama
    from genlight.pipeline import train
    from tests.helpers import TEACHER

    cfg = _distill_cfg(cfg_factory)
    net = hydra.utils.instantiate(cfg.model.net)
    # another vocabulary: more rows
    bigger = tiny_llama(tokenizer, hidden_size=32, num_layers=1, num_heads=2, intermediate_size=64)
    bigger.resize_token_embeddings(len(tokenizer) + 8)
    bigger.save_pretrained(tmp_path / "bigger")
    with pytest.raises(ValueError, match=r"teacher.pretrained=.*bigger: the teacher's LM head has \d+ rows"):
        DistillModule(net, tokenizer, teacher=str(tmp_path / "bigger"))
    # the same size, another tokenizer: two ids swapped
    vocab = tokenizer.get_vocab()
    a, b = sorted(vocab, key=vocab.get)[10:12]
    swapped = tokenizer.backend_tokenizer.to_str().replace(f'"{a}":{vocab[a]}', "@A@").replace(
        f'"{b}":{vocab[b]}', f'"{b}":{vocab[a]}').replace("@A@", f'"{a}":{vocab[b]}')
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "tokenizer.json").write_text(swapped)
    other = PreTrainedTokenizerFast(tokenizer_file=str(tmp_path / "other" / "tokenizer.json"),
                                    **{k: getattr(tokenizer, k) for k in ("bos_token", "eos_token", "pad_token")})
    assert other.get_vocab() != vocab and len(other) == len(tokenizer)
    other.save_pretrained(tmp_path / "other")
    tiny_llama(tokenizer, hidden_size=32, num_layers=1, num_heads=2, intermediate_size=64).save_pretrained(
        tmp_path / "other")
    with pytest.raises(ValueError, match="teacher.pretrained=.*other: the teacher's tokenizer differs"):
        DistillModule(net, tokenizer, teacher=str(tmp_path / "other"))
    for key, value, match in (("beta", 1.5, r"algo.beta=1.5"), ("lmbda", -0.1, r"algo.lmbda=-0.1"),
                              ("temperature", 0.0, r"algo.temperature=0.0")):
        with pytest.raises(ValueError, match=match):
            DistillModule(net, tokenizer, teacher=str(TEACHER), **{key: value})
    # through train.py: no teacher named, a teacher that is not there, an option out of range: before the warm start
    cfg = cfg_factory("algo=distill", f"teacher.pretrained={TEACHER}", "algo.lmbda=1.5")
    with pytest.raises(ValueError, match=r"algo.lmbda=1.5: the fraction of on-policy steps must be in \[0, 1\]"):
        train(cfg)
    assert not (Path(cfg.paths.output_dir) / "sft_init").exists()  # the warm start never ran
    with pytest.raises(ValueError, match=r"missing mandatory config value\(s\): teacher.pretrained"):
        train(cfg_factory("algo=distill"))
    with pytest.raises(FileNotFoundError, match="teacher.pretrained='/nonexistent'"):
        train(cfg_factory("algo=distill", "teacher.pretrained=/nonexistent"))
    # off-policy steps need each row's completion
    m = DistillModule(net, tokenizer, teacher=str(TEACHER), lmbda=0.5)
    batch = {"prompts": ["1+1="], "prompt_input_ids": torch.tensor([[1, 2]]), "index": torch.tensor([7]),
             "columns": [{"source": "x"}]}
    with pytest.raises(ValueError, match="'completion' column, which train row 7 does not have"):
        m.dataset_completions(batch)
