"""Rollout engines: sample G completions per prompt and return the sampler's own log-probs.

RL spends most of its time here. The engine is behind a small interface (`RolloutEngine`) so
that another backend (e.g. vLLM on GPU) can replace the Hugging Face one without touching the
algorithm: it must return a `Rollout` and accept new weights through `load_weights`.

`HFRollout` runs a `transformers` causal LM with its KV cache (`DynamicCache`):
  1. prefill each prompt once,
  2. repeat its cache G times (the G samples share the prompt: no G-fold prefill),
  3. decode token by token with temperature / top-p sampling (temperature 0: greedy), stopping rows at <eos>.
The log-prob of each sampled token under the sampling policy, log pi_gen(y_t) (temperature and top-p applied, as
vLLM's `processed_logprobs`; greedy: the untempered distribution's, as vLLM's; computed with an FP32 LM head), is
recorded on the way, so no extra forward pass is needed for the importance ratio.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Protocol

import torch
from transformers import DynamicCache, PreTrainedModel

from genlight.models.lm import cache_kwarg, causal_lm, fp32_logits, is_sharded, position_ids, reshard


@dataclass
class Rollout:
    """N = prompts x G completions, right-padded to the longest one (T tokens)."""

    completion_ids: torch.Tensor  # (N, T) long, pad after <eos>
    completion_mask: torch.Tensor  # (N, T) bool, the generated tokens, <eos> included
    logps: torch.Tensor  # (N, T) float32, log pi_gen(y_t | x, y_<t), 0 where masked
    truncated: torch.Tensor  # (N,) bool, stopped by max_new_tokens before <eos>
    # (N, T) bool, the tokens the policy sampled, when others are in the completion (a multi-turn episode's tool
    # turns, src/envs/episodes.py): the loss, the KL and the token counts use `loss_mask`; None: all of them
    policy_mask: torch.Tensor | None = None

    @property
    def lengths(self) -> torch.Tensor:
        return self.completion_mask.sum(-1)

    @property
    def loss_mask(self) -> torch.Tensor:
        return self.completion_mask if self.policy_mask is None else self.policy_mask

    def to(self, device) -> Rollout:
        """The same rollout with its tensors on `device` (other fields as they are)."""
        return dataclasses.replace(self, **{f.name: v.to(device) for f in dataclasses.fields(self)
                                             if isinstance(v := getattr(self, f.name), torch.Tensor)})

    @staticmethod
    def cat(parts: list[Rollout], pad: int) -> Rollout:
        """The rollouts of consecutive pieces of a batch as one, right-padded to the longest."""
        if len(parts) == 1:
            return parts[0]
        t = max(p.completion_ids.size(1) for p in parts)
        widen = lambda x, v: torch.nn.functional.pad(x, (0, t - x.size(1)), value=v)  # noqa: E731
        return Rollout(torch.cat([widen(p.completion_ids, pad) for p in parts]),
                       torch.cat([widen(p.completion_mask, False) for p in parts]),
                       torch.cat([widen(p.logps, 0.0) for p in parts]),
                       torch.cat([p.truncated for p in parts]),
                       None if parts[0].policy_mask is None else torch.cat([widen(p.loss_mask, False) for p in parts]))


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


# --------------------------------------------------------------------------- sampling
def nucleus_logprobs(logits: torch.Tensor, top_p: float) -> torch.Tensor:
    """log-probs of the distribution a nucleus sampler draws from: the smallest set of tokens whose probability
    reaches top_p (the token that crosses it included), renormalised; -inf outside (top_p = 1: log softmax). These are
    what vLLM records as `processed_logprobs`, so both engines report log pi_gen of the same distribution."""
    logp = torch.log_softmax(logits, dim=-1)
    if top_p >= 1.0:
        return logp
    sorted_logp, order = logp.sort(dim=-1, descending=True)
    sorted_p = sorted_logp.exp()
    drop = sorted_p.cumsum(-1) - sorted_p >= top_p  # tokens after the nucleus (the first always stays)
    dropped = torch.zeros_like(drop).scatter(-1, order, drop)
    return torch.log_softmax(logits.masked_fill(dropped, float("-inf")), dim=-1)


def _storage(t: torch.Tensor) -> int:
    from torch.distributed.tensor import DTensor

    return (t.to_local() if isinstance(t, DTensor) else t).data_ptr()


def load_into(model, state_dict: dict[str, torch.Tensor]) -> None:
    """Copy `state_dict` into `model` in place (nothing to do when it is the model's own); under FSDP2 shard to
    shard, on every process."""
    own = model.state_dict()
    if own.keys() == state_dict.keys() and all(_storage(own[k]) == _storage(v) for k, v in state_dict.items()):
        return
    if is_sharded(model):
        reshard(model)
    model.load_state_dict(state_dict)


# --------------------------------------------------------------------------- engine
class HFRollout:
    """Batched KV-cache sampling with a `transformers` causal LM (the policy or a lagged copy), at most
    `max_batch_size` sequences at a time (None: the whole call), so that the KV cache and the per-step logits are
    bounded by that, not by the step's prompts x G."""

    def __init__(self, model: PreTrainedModel, eos_token_id: int, pad_token_id: int, max_batch_size: int | None = None):
        if max_batch_size is not None and max_batch_size < 1:
            raise ValueError(f"rollout.max_batch_size={max_batch_size}: must be >= 1 (or null: no bound)")
        self.model, self.eos, self.pad = model, eos_token_id, pad_token_id
        self.max_batch_size = max_batch_size
        self._cache_kw = cache_kwarg(model)

    @property
    def sharded(self) -> bool:
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
        if temperature < 0:
            raise ValueError(f"temperature={temperature}: must be >= 0 (0: greedy)")
        was_training = self.model.training
        self.model.eval()
        try:
            parts = [self._generate(ids, mask, g, max_new_tokens, temperature, top_p, generator)
                     for ids, mask, g in self._pieces(prompt_ids, prompt_mask, num_samples)]
            return Rollout.cat(parts, self.pad)
        finally:
            self.model.train(was_training)

    def _pieces(self, prompt_ids, prompt_mask, g):
        """(prompts, mask, samples per prompt) of each piece of at most `max_batch_size` samples, in order: whole
        groups where they fit (each prompt prefilled once), else a group's samples split over pieces (the prompt
        prefilled once per sample there)."""
        n, cap = prompt_ids.size(0) * g, self.max_batch_size or prompt_ids.size(0) * g
        for s in range(0, n, cap):
            e = min(s + cap, n)
            if s % g == 0 and e % g == 0:
                yield prompt_ids[s // g : e // g], prompt_mask[s // g : e // g], g
            else:
                idx = torch.arange(s, e, device=prompt_ids.device) // g
                yield prompt_ids[idx], prompt_mask[idx], 1

    def _generate(self, prompt_ids, prompt_mask, g, max_new_tokens, temperature, top_p, generator) -> Rollout:
        sharded = self.sharded  # once per call, not at every decoding step
        greedy = temperature == 0  # the argmax token, with the log-probs of the untempered distribution (as vLLM)
        temperature = 1.0 if greedy else temperature
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
            logp = nucleus_logprobs(logits, 1.0 if greedy else top_p)  # log pi_gen: what is sampled from
            if greedy:
                tok = logits.argmax(-1)
            else:
                probs = torch.softmax(logits, dim=-1) if top_p >= 1.0 else logp.exp()
                tok = torch.multinomial(probs, 1, generator=generator).squeeze(-1)
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
