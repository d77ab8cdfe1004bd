"""Causal language models: the tiny Llama of the embedded default, or any local HF checkpoint; the helpers every
algorithm and engine runs them with (the LM head in float32 and in chunks, positions, the KV-cache argument);
FSDP2 sharding."""

from __future__ import annotations

import functools
import inspect
import types
from pathlib import Path

import torch
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedModel,
)

# The LM head's float32 logits are computed in chunks of at most this many elements (tokens x vocabulary): 2**24
# floats, 64 MiB. At a 151,936-row vocabulary that is 110 tokens a chunk, whatever the batch; a character
# vocabulary of 100 takes 167,772 tokens a chunk, so small runs compute in one chunk as before.
LOGITS_CHUNK_ELEMENTS = 2**24


def causal_lm(model) -> PreTrainedModel:
    """The `transformers` causal LM inside a peft (LoRA) wrapper, or the model itself: its `base_model` is
    the transformer stack (hidden states) and `get_output_embeddings()` the LM head, adapters included."""
    return model.get_base_model() if hasattr(model, "peft_config") else model


def cache_kwarg(model: PreTrainedModel) -> str:
    """transformers >= 5.x names the KV cache argument `cache`; earlier versions `past_key_values`."""
    return _cache_kwarg_of(type(causal_lm(model).base_model))


@functools.cache
def _cache_kwarg_of(cls: type) -> str:  # inspected once per model class, not on every forward
    return "cache" if "cache" in inspect.signature(cls.forward).parameters else "past_key_values"


def position_ids(mask: torch.Tensor) -> torch.Tensor:
    """Positions that ignore left padding: 0 at each row's first real token."""
    return (mask.long().cumsum(-1) - 1).clamp(min=0)


def _head_weights(model) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The LM head's weight and bias as tensors. Tied embeddings: the weight where the model keeps it (under FSDP2
    the head's own reference is stale; the stack's forward has gathered the embedding's)."""
    lm = causal_lm(model)
    head = lm.get_output_embeddings()
    if getattr(lm.config, "tie_word_embeddings", False):
        weight = lm.get_input_embeddings().weight
    elif isinstance(head, torch.nn.Linear | TiedHead):
        weight = head.weight
    else:  # e.g. LoRA on the LM head (peft's all-linear leaves it out): its weight alone is not the head
        raise ValueError(f"the LM head {type(head).__name__} is not a plain linear layer: leave it out of "
                         "model.lora.target_modules")
    return weight, getattr(head, "bias", None)


def _sharded_head(model):
    """An untied LM head sharded as its own FSDP2 unit (`fsdp2_shard`), or None: it must be called through its
    module (forward or `chunked_logps`), whose hooks gather its weight and reduce-scatter its gradient."""
    head = causal_lm(model).get_output_embeddings()
    return head if hasattr(head, "chunked_logps") else None


def fp32_logits(model: PreTrainedModel, hidden: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """All logits of `hidden`'s positions, from the LM head in float32, outside any autocast (ScaleRL: FP32
    logits at the LM head). For a few positions at a time (one decoding step); `head_logps` for many."""
    with torch.autocast(hidden.device.type, enabled=False):
        if (head := _sharded_head(model)) is not None:
            logits = head(hidden.float()).float()
            return logits / temperature if temperature != 1.0 else logits
        weight, bias = _head_weights(model)
        return _logits(hidden, weight.float(), None if bias is None else bias.float(), temperature)


def _logits(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, temperature: float) -> torch.Tensor:
    logits = hidden.float() @ weight.T
    if bias is not None:
        logits = logits + bias
    return logits / temperature if temperature != 1.0 else logits


class _ChunkedHeadLogp(torch.autograd.Function):
    """log softmax((h W^T + b) / temperature)[y] per position, with its gradient, never holding more than one
    chunk of float32 logits: the forward keeps each chunk's log-partition only, the backward recomputes each
    chunk's logits, d logp / d logits = onehot(y) - softmax (divided by the temperature). The entropy H of each
    position has its gradient too, d H / d logits = -p (log p + H) (an entropy bonus, `algo.entropy_coef`)."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, temperature, chunk, want_entropy, want_argmax):
        w = weight.float()
        b = None if bias is None else bias.float()
        n = hidden.size(0)
        logp = torch.empty(n, dtype=torch.float32, device=hidden.device)
        lse = torch.empty_like(logp)
        entropy = torch.empty_like(logp) if want_entropy else None
        argmax = torch.empty(n, dtype=torch.long, device=hidden.device) if want_argmax else None
        for s in range(0, n, chunk):
            logits = _logits(hidden[s : s + chunk], w, b, temperature)
            lse[s : s + chunk] = z = torch.logsumexp(logits, -1)
            logp[s : s + chunk] = logits.gather(-1, targets[s : s + chunk, None]).squeeze(-1) - z
            if want_argmax:
                argmax[s : s + chunk] = logits.argmax(-1)
            if want_entropy:  # H = log Z - sum_v p_v logit_v
                entropy[s : s + chunk] = z - (torch.softmax(logits, -1) * logits).sum(-1)
        ctx.save_for_backward(hidden, weight, bias, targets, lse, entropy)
        ctx.temperature, ctx.chunk = temperature, chunk
        if argmax is not None:
            ctx.mark_non_differentiable(argmax)
        ctx.set_materialize_grads(False)  # an output the loss does not use (the entropy, mostly) gets None
        return logp, entropy, argmax

    @staticmethod
    def backward(ctx, grad, grad_entropy, _grad_argmax):
        # float32 as in the forward, also when the backward is called inside an autocast region (RLVR's
        # manual_backward runs within its training step)
        with torch.autocast(ctx.saved_tensors[0].device.type, enabled=False):
            return _ChunkedHeadLogp._backward(ctx, grad, grad_entropy)

    @staticmethod
    def _backward(ctx, grad, grad_entropy=None):
        hidden, weight, bias, targets, lse, entropy = ctx.saved_tensors
        if grad is None:
            grad = torch.zeros_like(lse)
        need_h, need_w, need_b = ctx.needs_input_grad[:3]
        w = weight.float()
        b = None if bias is None else bias.float()
        grad_h = torch.empty_like(hidden) if need_h else None
        grad_w = torch.zeros_like(w) if need_w else None
        grad_b = torch.zeros_like(b) if need_b else None
        for s in range(0, hidden.size(0), ctx.chunk):
            h, g = hidden[s : s + ctx.chunk], grad[s : s + ctx.chunk, None].float()
            logits = _logits(h, w, b, ctx.temperature)
            # d logp_y / d logits = onehot(y) - p and dH / d logits = -p (log p + H), p = softmax(logits): in place on
            # the recomputed chunk, g (onehot(y) - p) - g_H p (log p + H) = p (-g - g_H (log p + H)) + g onehot(y)
            logq = logits.sub_(lse[s : s + ctx.chunk, None])
            scale = -g
            if grad_entropy is not None:
                g_h, h_ent = grad_entropy[s : s + ctx.chunk, None].float(), entropy[s : s + ctx.chunk, None]
                scale = scale - g_h * (logq + h_ent)
            d = logq.exp_().mul_(scale)
            d.scatter_add_(-1, targets[s : s + ctx.chunk, None], g)
            if ctx.temperature != 1.0:
                d.div_(ctx.temperature)
            if need_h:
                grad_h[s : s + ctx.chunk] = (d @ w).to(hidden.dtype)
            if need_w:
                grad_w.addmm_(d.T, h.float())
            if need_b:
                grad_b.add_(d.sum(0))
        return (grad_h, None if grad_w is None else grad_w.to(weight.dtype),
                None if grad_b is None else grad_b.to(bias.dtype), None, None, None, None, None)


def head_logps(model, hidden: torch.Tensor, targets: torch.Tensor, temperature: float = 1.0, entropy: bool = False,
               argmax: bool = False, chunk_elements: int | None = None):
    """log pi(y | h) of each position of `hidden` (N, H) for its target token `targets` (N,), from the LM head in
    float32 (outside any autocast; temperature applied), with its gradient; with `entropy` the entropy of pi at
    each position and with `argmax` the greedy token (no gradient; else None). The logits are computed in chunks of
    at most `chunk_elements` (default `LOGITS_CHUNK_ELEMENTS`) and recomputed in the backward, so memory holds one
    chunk of (tokens x vocabulary) floats, never the batch's."""
    vocab = causal_lm(model).get_output_embeddings().weight.size(0)
    chunk = max(1, (chunk_elements or LOGITS_CHUNK_ELEMENTS) // vocab)
    with torch.autocast(hidden.device.type, enabled=False):
        if (head := _sharded_head(model)) is not None:
            return head.chunked_logps(hidden, targets, temperature, chunk, entropy, argmax)
        weight, bias = _head_weights(model)
        return _ChunkedHeadLogp.apply(hidden, weight, bias, targets, temperature, chunk, entropy, argmax)


def _linear_head_logps(head: torch.nn.Linear, hidden, targets, temperature, chunk, entropy, argmax):
    """`head_logps` as a method of a sharded untied head, registered as an FSDP2 forward method: inside it the
    head's weight is gathered, and the gradient that reaches it is reduce-scattered after the backward."""
    return _ChunkedHeadLogp.apply(hidden, head.weight, head.bias, targets, temperature, chunk, entropy, argmax)


def is_sharded(model) -> bool:
    """Whether `model`'s weights are sharded over processes (FSDP2 DTensors): its forward passes are collective."""
    from torch.distributed.tensor import DTensor

    return torch.distributed.is_initialized() and any(isinstance(p, DTensor) for p in model.parameters())


def reshard(model) -> None:
    """Return every FSDP2 unit of `model` to its sharded parameters. The root unit keeps its gathered weights
    after a forward pass until the backward; a frozen copy (reference, generator) has no backward, so this
    is needed before its parameters are read or written (TR-DPO's refresh, the generator's sync)."""
    from torch.distributed.fsdp import FSDPModule

    for module in model.modules():
        if isinstance(module, FSDPModule):
            module.reshard()


class TiedHead(torch.nn.Module):
    """The LM head of a model with tied embeddings, under FSDP2: it reads the embedding's weight at call time
    (`fully_shard` replaces the embedding's parameter, so the original head's reference would be a stale,
    never-updated copy). It holds no parameter of its own."""

    def __init__(self, embedding: torch.nn.Embedding, bias: torch.Tensor | None = None):
        super().__init__()
        object.__setattr__(self, "_embedding", embedding)  # not a submodule: the embedding stays where it is
        self.bias = bias

    @property
    def weight(self) -> torch.Tensor:
        return self._embedding.weight

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.linear(hidden, self._embedding.weight, self.bias)


def fsdp2_shard(model, mesh, mp_policy=None) -> None:
    """FSDP2: `fully_shard` each transformer block (the classes in the model's `_no_split_modules`, so any HF
    architecture), then the transformer stack (embeddings, final norm: the root unit our forward passes call)
    and an untied LM head. Tied embeddings stay in one unit; the LM head reads them through the embedding."""
    from torch.distributed.fsdp import fully_shard

    lm = causal_lm(model)
    blocks = set(getattr(lm, "_no_split_modules", None) or [])
    if not blocks:
        raise ValueError(f"trainer=fsdp: {type(lm).__name__} declares no `_no_split_modules` to shard by")
    kw = {"mesh": mesh} | ({"mp_policy": mp_policy} if mp_policy is not None else {})
    for module in lm.modules():
        if type(module).__name__ in blocks:
            fully_shard(module, **kw)
    fully_shard(lm.base_model, **kw)
    head = lm.get_output_embeddings()
    if head is None:  # a sequence classifier (reward model): its forward is the model's own, its score head the root's
        fully_shard(lm, **kw)
        return
    if getattr(lm.config, "tie_word_embeddings", False):
        lm.set_output_embeddings(TiedHead(lm.get_input_embeddings(), getattr(head, "bias", None)))
    else:  # its own unit; `head_logps` runs as one of its forward methods
        from torch.distributed.fsdp import register_fsdp_forward_method

        fully_shard(head, **kw)
        head.chunked_logps = types.MethodType(_linear_head_logps, head)
        register_fsdp_forward_method(head, "chunked_logps")


def tiny_llama(
    tokenizer,
    hidden_size: int = 128,
    num_layers: int = 4,
    num_heads: int = 4,
    intermediate_size: int = 512,
    max_position_embeddings: int = 256,
    tie_word_embeddings: bool = True,
    seed: int = 42,
) -> LlamaForCausalLM:
    """A small `LlamaForCausalLM` built from a config, initialised from its own `seed` (the defaults are
    conf/model/tiny_llama.yaml's, its seed the run's default)."""
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_heads,
        intermediate_size=intermediate_size,
        max_position_embeddings=max_position_embeddings,
        tie_word_embeddings=tie_word_embeddings,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return LlamaForCausalLM(config)


def is_sequence_classifier(config) -> bool:
    """Whether a checkpoint's config names a sequence classifier (a reward model: `...ForSequenceClassification`)."""
    return any(a.endswith("ForSequenceClassification") for a in (getattr(config, "architectures", None) or []))


def from_pretrained(tokenizer, path: str, dtype: str = "float32", **config) -> PreTrainedModel:
    """Any model saved with `save_pretrained` in a local directory (offline; never the hub), loaded as what its config
    says it is: a causal LM, or a sequence classifier (a reward model: its trained score head is loaded, not a new
    one). Each algorithm then checks that it is the kind it trains (`LMModule.build_model`). `config`: keys of the
    checkpoint's config to change (`model.net.max_position_embeddings=896`, as an experiment sets for the
    from-scratch default); a key the config does not have is refused, named."""
    if not Path(path).is_dir():
        raise FileNotFoundError(f"model.pretrained={path!r} is not a directory holding an HF checkpoint")
    cfg = AutoConfig.from_pretrained(path, local_files_only=True)
    for key, value in config.items():
        if not hasattr(cfg, key):
            raise ValueError(f"model.net.{key}={value!r}: the checkpoint's config at {path} ({type(cfg).__name__}) has "
                             f"no key {key!r}")
        setattr(cfg, key, value)
    auto = AutoModelForSequenceClassification if is_sequence_classifier(cfg) else AutoModelForCausalLM
    model = auto.from_pretrained(path, config=cfg, dtype=getattr(torch, dtype), local_files_only=True)
    if len(tokenizer) > model.get_input_embeddings().num_embeddings:
        raise ValueError(
            f"tokenizer at {path} has {len(tokenizer)} tokens but the model's embedding has "
            f"{model.get_input_embeddings().num_embeddings}: they do not belong together"
        )
    return model


def check_positions(model, prompt_len: int, budget: int, budget_key: str) -> None:
    """Refuse a prompt plus its completion budget longer than the model's positions (`max_position_embeddings`, GPT-2's
    `n_positions`): a rotary model would run past what it was built for silently, a learned-position one fail deep in
    its forward. Names the keys that set each length."""
    cfg = getattr(model, "config", None)
    limit = getattr(cfg, "max_position_embeddings", None) or getattr(cfg, "n_positions", None)
    if limit is not None and prompt_len + budget > limit:
        raise ValueError(f"a prompt of {prompt_len} tokens + {budget_key}={budget} = {prompt_len + budget} positions, "
                         f"more than the model's {limit} (max_position_embeddings): lower {budget_key} or "
                         "data.max_length, or raise model.net.max_position_embeddings")


def language_model(net, tokenizer) -> PreTrainedModel:
    """The network an LM algorithm trains, from what its `net` argument is: a `transformers` model (used as it is), a
    local checkpoint directory (`from_pretrained`), or a factory called as `net(tokenizer=tokenizer)` that returns one
    (`tiny_llama`, or the configs' `model.net`, a partial of it). Anything else is refused, naming what it was."""
    import os

    if isinstance(net, torch.nn.Module):
        model = net
    elif isinstance(net, (str, os.PathLike)):
        model = from_pretrained(tokenizer, str(net))
    elif callable(net):
        model = net(tokenizer=tokenizer)
        if not isinstance(model, torch.nn.Module):
            raise TypeError(f"net: the factory {getattr(net, '__name__', net)!r} returned a {type(model).__name__}, "
                            "not a model; it is called as net(tokenizer=...) and must return a transformers model")
    else:
        raise TypeError(f"net: a {type(net).__name__} ({net!r:.60}); pass a transformers model, a local checkpoint "
                        "directory, or a factory called as net(tokenizer=...) that returns a model (e.g. tiny_llama)")
    if not isinstance(model, PreTrainedModel) and not hasattr(model, "peft_config"):
        raise TypeError(f"net: a {type(model).__name__}, not a transformers model (PreTrainedModel): the algorithms "
                        "call its forward with input_ids / attention_mask, its config and generate()")
    embeddings = model.get_input_embeddings().num_embeddings
    if len(tokenizer) > embeddings:
        raise ValueError(f"net: the model's embedding has {embeddings} rows and the tokenizer {len(tokenizer)} tokens: "
                         "they do not belong together (pass the tokenizer the model was built or trained with)")
    return model
