"""Causal language models: the tiny Llama of the embedded default, or any local HF checkpoint."""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM, PreTrainedModel


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

    from src.models.rollout import causal_lm

    lm = causal_lm(model)
    blocks = set(getattr(lm, "_no_split_modules", None) or [])
    if not blocks:
        raise ValueError(f"trainer=fsdp: {type(lm).__name__} declares no `_no_split_modules` to shard by")
    kw = {"mesh": mesh} | ({"mp_policy": mp_policy} if mp_policy is not None else {})
    for module in lm.modules():
        if type(module).__name__ in blocks:
            fully_shard(module, **kw)
    fully_shard(lm.base_model, **kw)
    if getattr(lm.config, "tie_word_embeddings", False):
        head = lm.get_output_embeddings()
        lm.set_output_embeddings(TiedHead(lm.get_input_embeddings(), getattr(head, "bias", None)))
    else:
        fully_shard(lm.get_output_embeddings(), **kw)


def tiny_llama(
    tokenizer,
    hidden_size: int = 128,
    num_layers: int = 4,
    num_heads: int = 4,
    intermediate_size: int = 512,
    max_position_embeddings: int = 256,
    tie_word_embeddings: bool = True,
    seed: int = 0,
) -> LlamaForCausalLM:
    """A small `LlamaForCausalLM` built from a config, initialised from its own `seed`."""
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


def from_pretrained(tokenizer, path: str, dtype: str = "float32") -> PreTrainedModel:
    """Any causal LM saved with `save_pretrained` in a local directory (offline; never the hub)."""
    if not Path(path).is_dir():
        raise FileNotFoundError(f"model.pretrained={path!r} is not a directory holding an HF checkpoint")
    model = AutoModelForCausalLM.from_pretrained(path, dtype=getattr(torch, dtype), local_files_only=True)
    if len(tokenizer) > model.get_input_embeddings().num_embeddings:
        raise ValueError(
            f"tokenizer at {path} has {len(tokenizer)} tokens but the model's embedding has "
            f"{model.get_input_embeddings().num_embeddings}: they do not belong together"
        )
    return model
