"""Rollout engines: sample G completions per prompt and return the sampler's own log-probs.

RL spends most of its time here. The engine is behind a small interface (`RolloutEngine`) so
that another backend (e.g. vLLM on GPU) can replace the Hugging Face one without touching the
algorithm: it must return a `Rollout` and accept new weights through `load_weights`.

`HFRollout` runs a `transformers` causal LM with its KV cache (`DynamicCache`):
  1. prefill each prompt once,
  2. repeat its cache G times (the G samples share the prompt: no G-fold prefill),
  3. decode token by token with temperature / top-p sampling, stopping rows at <eos>.
The log-prob of each sampled token under the sampling policy, log pi_gen(y_t) (temperature
applied, computed with an FP32 LM head), is recorded on the way, so no extra forward pass is
needed for the importance ratio.
"""

from __future__ import annotations

import functools
import inspect
from dataclasses import dataclass
from typing import Protocol

import torch
from transformers import DynamicCache, PreTrainedModel


@dataclass
class Rollout:
    """N = prompts x G completions, right-padded to the longest one (T tokens)."""

    completion_ids: torch.Tensor  # (N, T) long, pad after <eos>
    completion_mask: torch.Tensor  # (N, T) bool, the generated tokens, <eos> included
    logps: torch.Tensor  # (N, T) float32, log pi_gen(y_t | x, y_<t), 0 where masked
    truncated: torch.Tensor  # (N,) bool, stopped by max_new_tokens before <eos>

    @property
    def lengths(self) -> torch.Tensor:
        return self.completion_mask.sum(-1)


class RolloutEngine(Protocol):
    """`load_weights` is called with new weights for the engine's model (pi_gen's refresh), and with the
    model's own state when it was changed in place (the policy after an optimizer step), before sampling
    from it: an engine that keeps its own copy of the weights (vLLM) refreshes it then."""

    def generate(
        self,
        prompt_ids: torch.Tensor,
        prompt_mask: torch.Tensor,
        num_samples: int,
        max_new_tokens: int,
        temperature: float = 1.0,
        top_p: float = 1.0,
        generator: torch.Generator | None = None,
    ) -> Rollout: ...

    def load_weights(self, state_dict: dict[str, torch.Tensor]) -> None: ...


# --------------------------------------------------------------------------- model helpers
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


def fp32_logits(model: PreTrainedModel, hidden: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """The LM head in float32, outside any autocast (ScaleRL: FP32 logits at the LM head)."""
    lm = causal_lm(model)
    head = lm.get_output_embeddings()
    # tied embeddings: read the weight where the model keeps it (under FSDP2 the head's own reference is stale)
    tied = getattr(lm.config, "tie_word_embeddings", False)
    with torch.autocast(hidden.device.type, enabled=False):
        if not tied and head.weight.dtype == torch.float32:
            logits = head(hidden.float())  # through the module: under FSDP2 its hooks gather the weight
        else:
            weight = lm.get_input_embeddings().weight if tied else head.weight
            logits = hidden.float() @ weight.float().T
            if getattr(head, "bias", None) is not None:
                logits = logits + head.bias.float()
    return logits / temperature if temperature != 1.0 else logits


def sample_top_p(logits: torch.Tensor, top_p: float, generator: torch.Generator | None) -> torch.Tensor:
    """Nucleus sampling: draw from the smallest set of tokens whose probability reaches top_p."""
    probs = torch.softmax(logits, dim=-1)
    if top_p < 1.0:
        sorted_p, order = probs.sort(dim=-1, descending=True)
        drop = sorted_p.cumsum(-1) - sorted_p >= top_p  # tokens after the nucleus (the first stays)
        sorted_p = sorted_p.masked_fill(drop, 0.0)
        choice = torch.multinomial(sorted_p, 1, generator=generator)
        return order.gather(-1, choice).squeeze(-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


def _storage(t: torch.Tensor) -> int:
    from torch.distributed.tensor import DTensor

    return (t._local_tensor if isinstance(t, DTensor) else t).data_ptr()


def load_into(model, state_dict: dict[str, torch.Tensor]) -> None:
    """Copy `state_dict` into `model` in place (nothing to do when it is the model's own); under FSDP2 shard to
    shard, on every process."""
    from src.models.lm import is_sharded, reshard

    own = model.state_dict()
    if own.keys() == state_dict.keys() and all(_storage(own[k]) == _storage(v) for k, v in state_dict.items()):
        return
    if is_sharded(model):
        reshard(model)
    model.load_state_dict(state_dict)


# --------------------------------------------------------------------------- engine
class HFRollout:
    """Batched KV-cache sampling with a `transformers` causal LM (the policy or a lagged copy)."""

    def __init__(self, model: PreTrainedModel, eos_token_id: int, pad_token_id: int):
        self.model, self.eos, self.pad = model, eos_token_id, pad_token_id
        self._cache_kw = cache_kwarg(model)

    @property
    def sharded(self) -> bool:
        from src.models.lm import is_sharded

        return is_sharded(self.model)

    def load_weights(self, state_dict: dict[str, torch.Tensor]) -> None:
        load_into(self.model, state_dict)

    @staticmethod
    def _all_done(done: torch.Tensor, sharded: bool) -> bool:
        """Every row has stopped; with sharded weights (FSDP2) on every process, since each decoding step is a
        collective forward pass that all processes must take together."""
        finished = done.all()
        if sharded:
            flag = finished.float()
            torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MIN)
            return bool(flag)
        return bool(finished)

    def _step(self, input_ids, attention_mask, pos, cache, temperature):
        out = causal_lm(self.model).base_model(
            input_ids=input_ids, attention_mask=attention_mask, position_ids=pos, use_cache=True,
            **{self._cache_kw: cache},
        )
        return fp32_logits(self.model, out.last_hidden_state[:, -1], temperature)

    @torch.no_grad()
    def generate(
        self,
        prompt_ids: torch.Tensor,
        prompt_mask: torch.Tensor,
        num_samples: int,
        max_new_tokens: int,
        temperature: float = 1.0,
        top_p: float = 1.0,
        generator: torch.Generator | None = None,
    ) -> Rollout:
        if temperature <= 0:
            raise ValueError(f"temperature={temperature}: must be > 0 (sampling)")
        was_training = self.model.training
        self.model.eval()
        try:
            return self._generate(prompt_ids, prompt_mask, num_samples, max_new_tokens, temperature, top_p, generator)
        finally:
            self.model.train(was_training)

    def _generate(self, prompt_ids, prompt_mask, g, max_new_tokens, temperature, top_p, generator) -> Rollout:
        sharded = self.sharded  # once per call, not at every decoding step
        cache = DynamicCache(config=causal_lm(self.model).config)
        # 1. prefill the B distinct prompts once
        logits = self._step(prompt_ids, prompt_mask, position_ids(prompt_mask), cache, temperature)
        # 2. share each prompt's cache among its G samples: (B, ...) -> (B*G, ...)
        if g > 1:
            cache.batch_repeat_interleave(g)
            logits = logits.repeat_interleave(g, 0)
        mask = prompt_mask.repeat_interleave(g, 0)
        pos = mask.sum(-1, keepdim=True) - 1
        n = mask.size(0)
        done = torch.zeros(n, dtype=torch.bool, device=mask.device)
        ids, logps, alive = [], [], []
        # 3. decode
        for t in range(max_new_tokens):
            logp = torch.log_softmax(logits, dim=-1)
            tok = sample_top_p(logits, top_p, generator)
            tok = tok.masked_fill(done, self.pad)
            ids.append(tok)
            logps.append(logp.gather(-1, tok.unsqueeze(-1)).squeeze(-1).masked_fill(done, 0.0))
            alive.append(~done)
            done = done | (tok == self.eos)
            if self._all_done(done, sharded) or t == max_new_tokens - 1:
                break
            mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
            pos = pos + 1
            logits = self._step(tok.unsqueeze(-1), mask, pos, cache, temperature)
        return Rollout(
            completion_ids=torch.stack(ids, 1),
            completion_mask=torch.stack(alive, 1),
            logps=torch.stack(logps, 1),
            truncated=~done,
        )
