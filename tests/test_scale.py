"""The path to real checkpoints: LoRA (peft), gradient checkpointing, bf16 autocast, and every algorithm on
tiny Qwen2 and GPT-2 checkpoints with a byte-level BPE tokenizer (not only the default Llama)."""

from __future__ import annotations

import copy

import pytest
import torch
from lightning.pytorch.callbacks import Callback
from transformers import AutoModelForCausalLM

from genlight.datamodules.arithmetic import ArithmeticTask
from genlight.datamodules.lm import LMDataModule
from genlight.lightning_modules.dpo import DPOModule, pair_logps
from genlight.lightning_modules.lm import policy
from genlight.lightning_modules.sft import SFTModule
from genlight.models import tiny_llama
from genlight.models.logps import completion_logps, masked_nll
from tests.helpers import RLVR_RUN, train_with
from tests.helpers.checkpoints import tiny_checkpoint

LORA = {"r": 4, "alpha": 8, "dropout": 0.0, "target_modules": "all-linear"}


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("ckpts")
    return {arch: tiny_checkpoint(arch, root / arch) for arch in ("qwen2", "gpt2", "llama")}


class Losses(Callback):
    """The training loss of each step."""

    def __init__(self):
        self.losses = []

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        self.losses.append(float(outputs["loss"]))


def _net(tokenizer):
    return lambda tokenizer: tiny_llama(tokenizer, hidden_size=32, num_layers=2, num_heads=2, intermediate_size=64, seed=0)


def _batch(tokenizer, kind: str, n: int = 8, packing: bool = False):
    dm = LMDataModule(ArithmeticTask(n_train=32, n_val=8, n_test=8), tokenizer, kind=kind, batch_size=n, packing=packing)
    dm.setup()
    return next(iter(dm.train_dataloader()))


# ------------------------------------------------------------------------------------------------ LoRA
def test_lora_trains_only_the_adapters_lowers_the_loss_and_exports_merged(cfg_factory, tmp_path):
    """Only adapter weights change; the loss falls; hf/ (merged) gives the adapted model's logits and
    hf/adapter/ holds the adapter alone."""
    cfg = cfg_factory("algo=sft", "model.lora.r=8", "model.lora.alpha=16", "model.lora.dropout=0.0", "algo.lr=3e-3",
                      "algo.warmup_steps=0", "trainer.max_steps=30", "trainer.val_check_interval=30", "test=false",
                      "callbacks=default", "logger=csv")
    initial = {k: v.clone() for k, v in tiny_llama(__import__("genlight.models", fromlist=["char_tokenizer"]).char_tokenizer(),
                                                    seed=cfg.seed).state_dict().items()}
    rec = Losses()
    _, objs = train_with(cfg, rec)
    module = objs["module"]
    trainable = {n for n, p in module.model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable), "only adapter weights train"
    base = module.model.get_base_model()
    for name, p in base.named_parameters():
        if "lora_" not in name:
            key = name.replace(".base_layer", "")
            assert torch.equal(p, initial[key]), f"the frozen base weight {key} changed"
    assert sum(rec.losses[-5:]) / 5 < 0.9 * sum(rec.losses[:5]) / 5, f"loss did not fall: {rec.losses[:5]} -> {rec.losses[-5:]}"

    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "hf", local_files_only=True).eval()
    assert (tmp_path / "hf" / "adapter" / "adapter_config.json").is_file()
    ids = objs["module"].tokenizer(["12+34=", "7+8="], padding=True, return_tensors="pt")
    module.model.eval()
    with torch.no_grad():
        assert torch.allclose(merged(**ids).logits, module.model(**ids).logits, atol=1e-5)
        assert not torch.allclose(merged(**ids).logits, tiny_llama(objs["module"].tokenizer, seed=cfg.seed)(**ids).logits)


def test_lora_reference_is_the_base_model_with_adapters_disabled(tokenizer):
    """No second copy of the model: pi_ref is the policy with its adapters off, equal to the base model."""
    base = _net(tokenizer)(tokenizer)
    module = DPOModule(net=lambda tokenizer: copy.deepcopy(base), tokenizer=tokenizer, lora=LORA)
    assert module.ref_model is None and module.has_reference
    with torch.no_grad():  # make the adapters do something
        for n, p in module.model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.1)
    batch = _batch(tokenizer, "preference")
    ref_c, ref_r = module.reference_logps(batch, "train")
    want = pair_logps(base.eval(), batch)[0].chunk(2)
    assert torch.allclose(ref_c, want[0], atol=1e-5) and torch.allclose(ref_r, want[1], atol=1e-5)
    with torch.no_grad():
        policy_c = pair_logps(module.model, batch)[0].chunk(2)[0]
    assert not torch.allclose(policy_c, ref_c, atol=1e-3), "the adapted policy should differ from its reference"
    n_base = sum(p.numel() for p in base.parameters())
    assert sum(p.numel() for p in module.parameters()) < 1.2 * n_base, "a second copy of the model was made"


@pytest.mark.parametrize("alpha", [1.0, 0.5])
def test_tr_dpo_refresh_with_lora_is_the_alpha_rule_on_the_weights(tokenizer, alpha):
    """With adapters, pi_ref <- alpha pi_theta + (1 - alpha) pi_ref holds on the weights (base W + alpha dW) and the
    policy itself is unchanged by the refresh; the reference cache is cleared."""
    module = DPOModule(net=_net(tokenizer), tokenizer=tokenizer, lora=LORA)
    with torch.no_grad():
        for n, p in module.model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.1)
    batch = _batch(tokenizer, "preference")
    module.eval()
    with torch.no_grad():
        policy_before = pair_logps(module.model, batch)[0]
    from peft.tuners.lora import LoraLayer

    layers = [m for m in module.model.modules() if isinstance(m, LoraLayer)]
    want = [m.get_base_layer().weight + alpha * m.get_delta_weight("default") for m in layers]
    module._ref_cache[("train", 0)] = (0.0, 0.0)
    module.refresh_reference(alpha)
    assert not module._ref_cache
    for m, w in zip(layers, want):
        assert torch.allclose(m.get_base_layer().weight, w, atol=1e-6)
    with torch.no_grad():
        assert torch.allclose(pair_logps(module.model, batch)[0], policy_before, atol=1e-5), "the policy moved"
        with module.reference() as ref:
            ref_logps = pair_logps(ref, batch)[0]
    if alpha == 1.0:  # a hard update: the reference is the policy
        assert torch.allclose(ref_logps, policy_before, atol=1e-5)
    else:
        assert not torch.allclose(ref_logps, policy_before, atol=1e-4)


class BatchKinds(Callback):
    """Whether each training batch was packed (DPO prompt trees carry `logp_index`, SFT rows `position_ids`)."""

    def __init__(self):
        self.packed: list[bool] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.packed.append("logp_index" in batch or "position_ids" in batch)


@pytest.mark.parametrize("algo", ["sft", "dpo", "dpo_packed", "rlvr"])
def test_lora_runs_every_algorithm(cfg_factory, algo):
    """Only the adapters train (every other weight is frozen, and B moved from its zero start); packed DPO batches
    are packed."""
    extra = (RLVR_RUN if algo == "rlvr" else ["algo=sft"] if algo == "sft"
             else ["algo=dpo", "warm_start.max_steps=0", f"data.packing={algo == 'dpo_packed'}"])
    kinds = BatchKinds()
    metrics, objs = train_with(cfg_factory(*extra, "model.lora.r=4", "trainer.max_steps=2", "trainer.val_check_interval=2",
                                           "test=false"), kinds)
    module = objs["module"]
    assert module.uses_lora and torch.isfinite(metrics["train/loss"])
    trained = {n for n, p in module.model.named_parameters() if p.requires_grad}
    assert trained and all("lora_" in n for n in trained)
    assert any(p.abs().sum() > 0 for n, p in module.model.named_parameters() if "lora_B" in n), "the adapters never moved"
    assert kinds.packed == [algo == "dpo_packed"] * 2


# ------------------------------------------------------------------------------------- checkpointing
def _grads(model) -> dict[str, torch.Tensor]:
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("path", ["sft", "shared_prompt", "packed_pairs"])
def test_gradient_checkpointing_gives_the_plain_gradients(tokenizer, path):
    """Non-reentrant checkpointing recomputes activations; the gradients are the plain run's (SFT's forward, the
    shared-prompt forward of DPO / RLVR, which falls back to one prompt encoding per completion, and packed DPO
    pairs, which keep their prompt trees)."""
    plain = _net(tokenizer)(tokenizer).train()
    ckpt = policy(copy.deepcopy(plain), gradient_checkpointing=True).train()
    assert ckpt.is_gradient_checkpointing and not plain.is_gradient_checkpointing
    batch = _batch(tokenizer, "sft" if path == "sft" else "preference", packing=path == "packed_pairs")
    for model in (plain, ckpt):
        if path == "sft":
            loss, _ = masked_nll(model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits,
                                 batch["labels"])
        else:
            loss = -pair_logps(model, batch)[0].sum()
        loss.backward()
    a, b = _grads(plain), _grads(ckpt)
    assert a.keys() == b.keys() and a
    for n in a:
        assert torch.allclose(a[n], b[n], atol=1e-6, rtol=1e-5), n


def test_gradient_checkpointing_runs_from_the_config(cfg_factory):
    _, objs = train_with(cfg_factory("algo=dpo", "warm_start.max_steps=0", "model.gradient_checkpointing=true",
                                     "trainer.max_steps=2", "test=false"))
    assert objs["module"].model.is_gradient_checkpointing


# --------------------------------------------------------------------------------------------- bf16
@pytest.mark.parametrize("algo", ["sft", "dpo", "dpo_packed", "rlvr"])
def test_bf16_mixed_on_cpu_runs_in_bf16_with_an_fp32_head(cfg_factory, algo):
    """trainer.precision=bf16-mixed: the decoder layers compute in bfloat16, the LM head log-probs stay float32."""
    import lightning as L

    class Dtypes(L.Callback):
        def __init__(self):
            self.layer, self.loss = set(), set()

        def on_train_start(self, trainer, module):
            layer = module.model.model.layers[0]
            layer.mlp.register_forward_hook(lambda m, i, o: self.layer.add(o.dtype))

        def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
            self.loss.add(outputs["loss"].dtype)

    extra = (RLVR_RUN if algo == "rlvr" else ["algo=sft"] if algo == "sft"
             else ["algo=dpo", "warm_start.max_steps=0", f"data.packing={algo == 'dpo_packed'}"])
    rec = Dtypes()
    metrics, _ = train_with(cfg_factory(*extra, "trainer.precision=bf16-mixed", "trainer.max_steps=2", "test=false"), rec)
    assert rec.layer == {torch.bfloat16}, "autocast did not run the decoder in bf16"
    assert rec.loss == {torch.float32} and torch.isfinite(metrics["train/loss"])


def test_completion_logps_are_float32_under_bf16_autocast(tokenizer):
    model = _net(tokenizer)(tokenizer)
    batch = _batch(tokenizer, "preference")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logp, _ = completion_logps(model, batch["prompt_input_ids"], batch["prompt_attention_mask"],
                                   batch["completion_ids"][:8], batch["completion_mask"][:8])
    assert logp.dtype == torch.float32


# ------------------------------------------------------------------------------- Qwen2 and GPT-2
@pytest.mark.parametrize("arch", ["qwen2", "gpt2"])
@pytest.mark.parametrize("algo", ["sft", "dpo", "rlvr"])
@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
def test_every_algorithm_on_qwen2_and_gpt2(cfg_factory, checkpoints, arch, algo, lora):
    """Each algorithm, with and without LoRA, on a non-Llama checkpoint with a byte-level BPE tokenizer and a
    ChatML template; the trained export reloads."""
    extra = RLVR_RUN if algo == "rlvr" else [f"algo={algo}"]
    cfg = cfg_factory(*extra, "model=hf", f"model.pretrained={checkpoints[arch]}", "trainer.max_steps=2",
                      "trainer.val_check_interval=2", "test=false", "callbacks=default",
                      *(["model.lora.r=4"] if lora else []))
    metrics, objs = train_with(cfg)
    assert torch.isfinite(metrics["train/loss"])
    cls = {"qwen2": "Qwen2ForCausalLM", "gpt2": "GPT2LMHeadModel"}[arch]
    module = objs["module"]
    assert type(module.model.get_base_model() if lora else module.model).__name__ == cls
    reloaded = AutoModelForCausalLM.from_pretrained(cfg.paths.output_dir + "/hf", local_files_only=True)
    assert type(reloaded).__name__ == cls
    # the export holds the trained policy (adapters merged), which moved from the checkpoint it started from
    ids = torch.tensor([[5, 6, 7, 8, 9]])
    initial = AutoModelForCausalLM.from_pretrained(checkpoints[arch], local_files_only=True)
    with torch.no_grad():
        got = reloaded(input_ids=ids).logits
        assert torch.allclose(got, module.model.eval()(input_ids=ids).logits, atol=1e-5)
        assert not torch.allclose(got, initial(input_ids=ids).logits, atol=1e-4)


def test_sft_module_on_qwen2_matches_the_hand_loss(checkpoints):
    """The completion-only loss on a byte-level BPE tokenizer: prompt and padding are masked."""
    from genlight.models.tokenizer import load_tokenizer

    tok = load_tokenizer(str(checkpoints["qwen2"]))
    module = SFTModule(net=lambda tokenizer: AutoModelForCausalLM.from_pretrained(checkpoints["qwen2"]), tokenizer=tok)
    batch = _batch(tok, "sft")
    loss, n, _, _ = module(batch)
    logits = module.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    logp = torch.log_softmax(logits[:, :-1].float(), -1)
    labels = batch["labels"][:, 1:]
    m = labels != -100
    want = -(logp.gather(-1, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1) * m).sum() / m.sum()
    assert torch.allclose(loss, want, atol=1e-5) and n == m.sum()


# ------------------------------------------------------------------------------------------ packing
@pytest.mark.parametrize("arch, max_tokens", [("llama", 64), ("qwen2", 64), ("gpt2", 64), ("llama", 12)])
def test_packed_sft_batch_has_the_padded_loss_and_gradients(checkpoints, arch, max_tokens):
    """data.packing=true: one row, no padding, positions restarting per sequence; transformers keeps attention
    within each sequence, so the loss and every gradient equal the padded batch's on the same examples."""
    from genlight.models.tokenizer import load_tokenizer

    tok = load_tokenizer(str(checkpoints[arch]))
    rows = [(f"w{i}", {"prompt": f"{a}+{b}=", "completion": str(a + b)}) for i, (a, b) in enumerate([(1, 2), (13, 44), (7, 95), (60, 6)])]
    batches = {}
    for packing in (False, True):
        dm = LMDataModule(ArithmeticTask(n_train=8, n_val=4, n_test=4), tok, kind="sft", packing=packing, max_length=max_tokens)
        examples = __import__("genlight.datamodules.lm", fromlist=["build_examples"]).build_examples(rows, tok, "sft", "x", 64, "error")
        batches[packing] = dm.collate(examples)
    packed, padded = batches[True], batches[False]
    assert "attention_mask" not in packed and int(packed["num_tokens"]) == int(padded["attention_mask"].sum())
    if max_tokens == 64:  # everything fits one row: not a single pad token
        assert packed["input_ids"].shape[0] == 1 and packed["input_ids"].numel() == int(packed["num_tokens"])
    else:  # rows of at most max_tokens
        assert packed["input_ids"].shape[0] > 1 and packed["input_ids"].shape[1] <= max_tokens
    model = AutoModelForCausalLM.from_pretrained(checkpoints[arch]).train()
    model.config.attn_pdrop = model.config.resid_pdrop = model.config.embd_pdrop = 0.0
    module = SFTModule(net=lambda tokenizer: model, tokenizer=tok)
    grads, losses = [], []
    for batch in (padded, packed):
        module.model.zero_grad()
        loss, n, _, _ = module(batch)
        loss.backward()
        losses.append((loss.item(), int(n)))
        grads.append(_grads(module.model))
    assert losses[0][1] == losses[1][1] and losses[0][0] == pytest.approx(losses[1][0], rel=1e-5)
    for name in grads[0]:
        assert torch.allclose(grads[0][name], grads[1][name], atol=1e-6, rtol=1e-4), name


def test_balanced_rows_are_few_even_and_within_capacity():
    """Packed rows are stacked as wide as the fullest. Longest-first balancing alone would put 5+3+3 = 11 in one
    row and need three rows; first-fit decreasing finds two. Evening out moves the item that lowers the fullest
    row most. Random batches: each item exactly once, no row over capacity, none far above the even share."""
    import random

    from genlight.datamodules.packing import _even_out, balanced_rows

    rows, used = balanced_rows([5, 5, 4, 3, 3], 10)
    assert sorted(used) == [10, 10] and sorted(map(sorted, rows)) == [[0, 1], [2, 3, 4]]
    rows, used = [[0, 1], [2]], [9, 3]
    _even_out(rows, used, [5, 4, 3])  # to rows of 5 and 7 (moving the 5 alone would give 4 and 8)
    assert sorted(used) == [5, 7] and used == [sum([5, 4, 3][i] for i in row) for row in rows]
    assert balanced_rows([300, 20], 128) == ([[0], [1]], [300, 20])  # an item over capacity gets its own row
    rng = random.Random(0)
    for n, lo, hi, cap in [(8, 140, 380, 1024), (16, 90, 250, 512), (128, 8, 16, 32), (64, 50, 500, 1024)]:
        lengths = [rng.randint(lo, hi) for _ in range(n)]
        rows, used = balanced_rows(lengths, cap)
        assert sorted(i for row in rows for i in row) == list(range(n)) and max(used) <= cap
        assert used == [sum(lengths[i] for i in row) for row in rows]
        assert max(used) - sum(lengths) / len(rows) < hi, (max(used), sum(lengths) / len(rows))


PAIRS = [("12+34=", "46", "47"), ("7+8=", "15", "105"), ("60+6=", "66", "6"), ("99+99=", "198", "1998"),
         ("1+2=", "3", "21")]


@pytest.mark.parametrize("arch, max_tokens, attn", [("llama", 128, "sdpa"), ("qwen2", 128, "sdpa"), ("gpt2", 128, "sdpa"),
                                                    ("llama", 16, "sdpa"), ("gpt2", 16, "eager")])
def test_packed_preference_pairs_have_the_padded_log_probs_and_gradients(checkpoints, arch, max_tokens, attn):
    """data.packing=true for DPO: each pair one padding-free prompt tree (prompt once, chosen and rejected as
    branches that never see each other), rows of at most 2 x max_length. Every sequence log-prob and every
    gradient of a DPO loss equal the padded batch's, on Llama, Qwen2 and GPT-2, with SDPA and eager attention."""
    from genlight.datamodules.lm import build_examples
    from genlight.models.tokenizer import load_tokenizer

    tok = load_tokenizer(str(checkpoints[arch]))
    rows = [(f"w{i}", {"prompt": p, "chosen": c, "rejected": r}) for i, (p, c, r) in enumerate(PAIRS)]
    examples = build_examples(rows, tok, "preference", "x", 64, "error")
    batches = {}
    for packing in (False, True):
        dm = LMDataModule(ArithmeticTask(n_train=8, n_val=4, n_test=4), tok, kind="preference", packing=packing,
                          max_length=max_tokens)
        batches[packing] = dm.collate(examples)
    packed, padded = batches[True], batches[False]
    real = sum(len(e["prompt_ids"]) + len(e["chosen_ids"]) + len(e["rejected_ids"]) for e in examples)
    assert int(packed["num_tokens"]) == real < padded["input_ids"].numel()
    if max_tokens == 128:  # everything in one row: no pad token at all
        assert packed["input_ids"].shape == (1, real)
    else:  # rows of at most 2 x max_length (the longest a pair's tree can be)
        assert packed["input_ids"].shape[0] > 1 and packed["input_ids"].shape[1] <= 2 * max_tokens
    model = AutoModelForCausalLM.from_pretrained(checkpoints[arch], attn_implementation=attn).train()
    out = []
    for batch in (padded, packed):
        model.zero_grad()
        logps, lengths = pair_logps(model, batch)
        chosen, rejected = logps.chunk(2)
        (-torch.nn.functional.logsigmoid(0.1 * (chosen - rejected)).mean()).backward()
        out.append((logps.detach(), lengths, _grads(model)))
    (lp0, n0, g0), (lp1, n1, g1) = out
    assert torch.equal(n0, n1) and torch.allclose(lp0, lp1, atol=1e-4, rtol=1e-5), (lp0, lp1)
    for name in g0:
        assert torch.allclose(g0[name], g1[name], atol=1e-6, rtol=1e-4), name


def test_a_packed_rejected_branch_does_not_see_the_chosen_one(checkpoints):
    """The tree mask is what makes packing exact: with the rejected branch also attending to the chosen tokens
    (a plain causal mask over the segment), its log-probs change."""
    from genlight.datamodules.lm import build_examples
    from genlight.models.logps import packed_completion_logps
    from genlight.models.tokenizer import load_tokenizer

    tok = load_tokenizer(str(checkpoints["llama"]))
    rows = [(f"w{i}", {"prompt": p, "chosen": c, "rejected": r}) for i, (p, c, r) in enumerate(PAIRS)]
    dm = LMDataModule(ArithmeticTask(n_train=8, n_val=4, n_test=4), tok, kind="preference", packing=True, max_length=128)
    batch = dm.collate(build_examples(rows, tok, "preference", "x", 64, "error"))
    model = AutoModelForCausalLM.from_pretrained(checkpoints["llama"]).eval()
    with torch.no_grad():
        tree = packed_completion_logps(model, batch, 2 * len(PAIRS))[0]
        flat = packed_completion_logps(model, {**batch, "branch_ids": torch.zeros_like(batch["branch_ids"])},
                                       2 * len(PAIRS))[0]
    chosen, rejected = len(PAIRS), slice(len(PAIRS), None)
    assert torch.allclose(tree[:chosen], flat[:chosen])  # chosen tokens come before rejected ones: the same
    assert (tree[rejected] - flat[rejected]).abs().min() > 1e-3


def test_packed_dpo_run_equals_the_padded_run(cfg_factory):
    """`algo=dpo data.packing=true` from the config: the same losses step by step and the same validation
    metrics as the padded run (reference log-probs cached, so the reference went through the packed path too)."""
    runs = []
    for packing in ("false", "true"):
        rec = Losses()
        metrics, _ = train_with(cfg_factory("algo=dpo", "warm_start.max_steps=0", f"data.packing={packing}",
                                            "trainer.max_steps=4", "algo.lr=1e-3", "test=false"), rec)
        runs.append((rec.losses, metrics))
    (l0, m0), (l1, m1) = runs
    assert len(l0) == 4 and l0 == pytest.approx(l1, rel=1e-4) and l0[0] != pytest.approx(l0[-1], rel=1e-3)
    for key in ("val/loss", "val/rewards/margins", "val/logps/chosen"):
        assert float(m0[key]) == pytest.approx(float(m1[key]), rel=1e-4, abs=1e-5), key


def test_packing_trains_sft_from_the_config_and_not_rlvr(cfg_factory, tokenizer):
    metrics, objs = train_with(cfg_factory("algo=sft", "data.packing=true", "trainer.max_steps=2", "test=false"))
    assert torch.isfinite(metrics["train/loss"]) and "val/exact_match" in metrics
    with pytest.raises(ValueError, match="data.kind='prompt' does not use it"):
        LMDataModule(ArithmeticTask(n_train=8, n_val=4, n_test=4), tokenizer, kind="prompt", packing=True)
