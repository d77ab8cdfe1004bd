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

Multi-turn episodes (src/envs/episodes.py) keep each episode's cache across its turns (`HFRollout.episodes`, an
`EpisodeCache`): a turn after a tool call prefills only the ids the cache does not hold yet (the tool turn, and the
turn's last token when the decoding loop stopped before feeding it), not the whole context again.
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


class EpisodeSession(Protocol):
    """What an engine may offer multi-turn episodes (`engine.episodes(prompt_ids, num_samples)`, src/envs/episodes.py):
    state kept between the turns of one step's episodes (the KV caches, `EpisodeCache`). An engine without it gets
    each turn's whole context in `generate`."""

    def running(self, local: bool) -> bool:
        """Whether a turn is to be taken: `local` (this process has episodes running), or, where every process must
        take the same forward passes (FSDP2), whether any process has."""
        ...

    def generate(self, episodes: list[int], contexts: list[list[int]], max_new_tokens: int, temperature: float = 1.0,
                 top_p: float = 1.0, generator: torch.Generator | None = None) -> Rollout:
        """One turn of `episodes` (indices, ascending), each continuing from its whole context so far (prompt + the
        episode's ids, each extending the one of its previous turn); their rollouts in that order."""
        ...


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
    bounded by that, not by the step's prompts x G. `episode_cache`: multi-turn episodes keep each episode's cache
    across its turns (`episodes`); False: every turn prefills its whole context again (then at most `max_batch_size`
    episodes' caches are held at once, where the kept caches of all a step's running episodes stay between turns)."""

    def __init__(self, model: PreTrainedModel, eos_token_id: int, pad_token_id: int, max_batch_size: int | None = None,
                 episode_cache: bool = True):
        if max_batch_size is not None and max_batch_size < 1:
            raise ValueError(f"rollout.max_batch_size={max_batch_size}: must be >= 1 (or null: no bound)")
        self.model, self.eos, self.pad = model, eos_token_id, pad_token_id
        self.max_batch_size = max_batch_size
        self.episode_cache = episode_cache
        self._cache_kw = cache_kwarg(model)

    @property
    def sharded(self) -> bool:
        return is_sharded(self.model)

    def load_weights(self, state_dict: dict[str, torch.Tensor]) -> None:
        load_into(self.model, state_dict)

    def episodes(self, prompt_ids: list[list[int]], num_samples: int) -> EpisodeCache:
        """The session of one step's multi-turn episodes, `num_samples` per prompt (`EpisodeCache`)."""
        return EpisodeCache(self, prompt_ids, num_samples, keep=self.episode_cache)

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

    def _step(self, input_ids, attention_mask, pos, cache, temperature, last: torch.Tensor | None = None):
        """The next-token logits after `input_ids` (at each row's position `last`; None: the last column)."""
        out = causal_lm(self.model).base_model(
            input_ids=input_ids, attention_mask=attention_mask, position_ids=pos, use_cache=True,
            **{self._cache_kw: cache},
        )
        hidden = out.last_hidden_state
        hidden = hidden[:, -1] if last is None else hidden[torch.arange(hidden.size(0), device=hidden.device), last]
        return fp32_logits(self.model, hidden, temperature)

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
            parts = [self._generate(ids, mask, g, max_new_tokens, temperature, top_p, generator)[0]
                     for _, _, ids, mask, g in self._pieces(prompt_ids, prompt_mask, num_samples)]
            return Rollout.cat(parts, self.pad)
        finally:
            self.model.train(was_training)

    def _pieces(self, prompt_ids, prompt_mask, g):
        """(first sample, end, prompts, mask, samples per prompt) of each piece of at most `max_batch_size` samples, in
        order: whole groups where they fit (each prompt prefilled once), else a group's samples split over pieces (the
        prompt prefilled once per sample there)."""
        n, cap = prompt_ids.size(0) * g, self.max_batch_size or prompt_ids.size(0) * g
        for s in range(0, n, cap):
            e = min(s + cap, n)
            if s % g == 0 and e % g == 0:
                yield s, e, prompt_ids[s // g : e // g], prompt_mask[s // g : e // g], g
            else:
                idx = torch.arange(s, e, device=prompt_ids.device) // g
                yield s, e, prompt_ids[idx], prompt_mask[idx], 1

    def _generate(self, prompt_ids, prompt_mask, g, max_new_tokens, temperature, top_p, generator):
        """The rollout of one piece, and its cache with the cache's attention mask (what an episode continues from)."""
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
        # 3. decode
        roll, mask = self._decode(logits, cache, mask, max_new_tokens, greedy, temperature, top_p, generator,
                                  self.sharded)
        return roll, cache, mask

    def _decode(self, logits, cache, mask, max_new_tokens, greedy, temperature, top_p, generator, sharded,
                done: torch.Tensor | None = None) -> tuple[Rollout, torch.Tensor]:
        """Sample from `logits` on, token by token, feeding each token to `cache`, until every row has stopped
        (`done`: rows stopped from the start). Returns the rollout and the cache's attention mask: a row's tokens after
        its <eos> are fed as padding and masked there (0), so the cache can be continued (`EpisodeCache`)."""
        pos = mask.sum(-1, keepdim=True) - 1
        done = torch.zeros(mask.size(0), dtype=torch.bool, device=mask.device) if done is None else done
        ids, logps, alive = [], [], []
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
            mask = torch.cat([mask, alive[-1].unsqueeze(-1).to(mask.dtype)], dim=1)
            pos = pos + 1
            logits = self._step(tok.unsqueeze(-1), mask, pos, cache, temperature)
        roll = Rollout(
            completion_ids=torch.stack(ids, 1),
            completion_mask=torch.stack(alive, 1),
            logps=torch.stack(logps, 1),
            truncated=~done,
        )
        return roll, mask


@dataclass
class _Piece:
    """Episodes sampled together, with their KV cache: row r of `cache` holds the context tokens `held[r]` of episode
    `episodes[r]`, at the columns where `mask[r]` is 1 (the rest: left padding, tokens fed after an <eos>, the padding
    of a shorter row's tool turn)."""

    episodes: list[int]
    held: list[list[int]]
    cache: DynamicCache | None = None
    mask: torch.Tensor | None = None  # (rows, columns) long

    def select(self, rows: list[int]) -> None:
        if rows == list(range(len(self.episodes))):
            return
        self.episodes, self.held = [self.episodes[r] for r in rows], [self.held[r] for r in rows]
        index = torch.tensor(rows, device=self.mask.device)
        self.cache.batch_select_indices(index)
        self.mask = self.mask[index]


class EpisodeCache:
    """The KV caches of one step's multi-turn episodes on `HFRollout`, kept across their turns (src/envs/episodes.py
    drives it through `EpisodeSession`).

    Turn 1 samples the episodes as `HFRollout.generate` samples G completions per prompt: in pieces of at most
    `max_batch_size` episodes, each prompt prefilled once for its G samples. Each piece keeps its cache after the turn;
    the next turn selects the rows of the episodes still running (`batch_select_indices`) and feeds each row only the
    ids its cache does not hold yet: the tool turn, after the turn's last token where the decoding loop stopped before
    feeding it. First the cache is compacted (`_compact`): each row's tokens gathered to the right, so the masked
    columns the turn before left do not widen every later step. The suffixes differ in length: they are right-padded,
    the padding masked (0), and every token's position is the count of real tokens before it (the attention mask's
    cumulative sum), the position it has in a plain forward over the whole context; each row's next-token logits are
    read at its last real token. Tokens fed after a row's <eos> are masked in the cache too (`HFRollout._decode`). So
    the keys and values a turn attends to are the plain forward's: the episodes equal those of re-prefilling every
    turn (tested: greedy ids, log-probs).

    Pieces only lose episodes (an episode never moves to another piece's cache). With `keep=False`, or a model with
    sliding-window layers (a masked column inside the window would shift it), nothing is kept: each turn prefills the
    whole contexts of the running episodes, left-padded, in pieces of at most `max_batch_size`.

    FSDP2 (sharded weights): every forward pass is collective, so every process takes the same ones: whether a turn is
    taken (`running`), a turn's number of pieces and its token limit are the largest over the processes; a process
    with fewer pieces runs idle ones (one pad token, its rows stopped from the start, greedy: no random draw), whose
    decoding steps follow the others' through `_all_done`."""

    def __init__(self, engine: HFRollout, prompt_ids: list[list[int]], num_samples: int, keep: bool = True):
        self.engine, self.prompts, self.g = engine, [list(p) for p in prompt_ids], num_samples
        self.n = len(prompt_ids) * num_samples
        self.device = next(engine.model.parameters()).device
        self.config = causal_lm(engine.model).config
        sliding = any(getattr(layer, "is_sliding", False) for layer in DynamicCache(config=self.config).layers)
        self.keep = keep and not sliding
        self.pieces: list[_Piece] | None = None  # built by the first turn

    def running(self, local: bool) -> bool:
        if not self.engine.sharded:
            return local
        flag = torch.tensor(float(local), device=self.device)
        torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
        return bool(flag)

    @torch.no_grad()
    def generate(self, episodes: list[int], contexts: list[list[int]], max_new_tokens: int, temperature: float = 1.0,
                 top_p: float = 1.0, generator: torch.Generator | None = None) -> Rollout:
        if temperature < 0:
            raise ValueError(f"temperature={temperature}: must be >= 0 (0: greedy)")
        if list(episodes) != sorted(set(episodes)):
            raise ValueError(f"episodes {episodes}: each once, ascending")
        model = self.engine.model
        was_training = model.training
        model.eval()
        try:
            return self._turn(list(episodes), [list(c) for c in contexts], max_new_tokens, temperature, top_p,
                              generator)
        finally:
            model.train(was_training)

    def _turn(self, episodes, contexts, max_new_tokens, temperature, top_p, generator) -> Rollout:
        engine, sharded = self.engine, self.engine.sharded
        first = self.pieces is None
        work = self._first_turn(episodes, contexts) if first else self._next_turn(episodes, contexts)
        if sharded:  # the same pieces and token limit on every process
            counts = torch.tensor([len(work), max_new_tokens], device=self.device)
            torch.distributed.all_reduce(counts, op=torch.distributed.ReduceOp.MAX)
            slots, max_new_tokens = int(counts[0]), int(counts[1])
        else:
            slots = len(work)
        parts = []
        for k in range(slots):
            if k < len(work):
                parts.append(work[k](max_new_tokens, temperature, top_p, generator, sharded))
                if not self.keep:  # at most one piece's cache at a time
                    self.pieces[k].cache = self.pieces[k].mask = None
            else:
                self._idle(max_new_tokens, sharded)
        if not self.keep:
            self.pieces = []
        if not parts:
            empty = torch.zeros(0, 0, device=self.device)
            return Rollout(empty.long(), empty.bool(), empty, torch.zeros(0, dtype=torch.bool, device=self.device))
        return Rollout.cat(parts, engine.pad)  # pieces hold ascending episodes, in order: `episodes`' order

    def _first_turn(self, episodes, contexts):
        if episodes != list(range(self.n)) or any(c != self.prompts[i // self.g] for i, c in zip(episodes, contexts)):
            raise ValueError("the first turn samples every episode from its prompt")
        engine = self.engine
        width = max(len(p) for p in self.prompts)
        ids = torch.tensor([[engine.pad] * (width - len(p)) + p for p in self.prompts], device=self.device)
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in self.prompts], device=self.device)
        self.pieces = []
        work = []
        for s, e, ids_p, mask_p, g in engine._pieces(ids, mask, self.g):
            piece = _Piece(list(range(s, e)), [list(self.prompts[i // self.g]) for i in range(s, e)])
            self.pieces.append(piece)

            def run(max_new_tokens, temperature, top_p, generator, sharded, piece=piece, ids_p=ids_p, mask_p=mask_p,
                    g=g):
                roll, piece.cache, mask = engine._generate(ids_p, mask_p, g, max_new_tokens, temperature, top_p,
                                                           generator)
                self._record(piece, roll, mask, mask_p.size(1))
                return roll

            work.append(run)
        return work

    def _next_turn(self, episodes, contexts):
        wanted = dict(zip(episodes, contexts))
        if self.keep:
            pieces = []
            for piece in self.pieces:
                rows = [r for r, i in enumerate(piece.episodes) if i in wanted]
                if rows:  # a piece whose episodes all ended is dropped with its cache
                    piece.select(rows)
                    pieces.append(piece)
            if sum(len(p.episodes) for p in pieces) != len(wanted):
                raise ValueError(f"episodes {sorted(set(wanted) - {i for p in pieces for i in p.episodes})} have no "
                                 "cache: each turn continues episodes of the previous one")
        else:  # nothing kept: pieces of the running episodes, prefilled whole
            cap = self.engine.max_batch_size or max(len(episodes), 1)
            pieces = [_Piece(episodes[s : s + cap], [[] for _ in episodes[s : s + cap]])
                      for s in range(0, len(episodes), cap)]
        self.pieces = pieces
        return [lambda *a, piece=piece: self._continue(piece, [wanted[i] for i in piece.episodes], *a)
                for piece in pieces]

    def _continue(self, piece: _Piece, contexts, max_new_tokens, temperature, top_p, generator, sharded) -> Rollout:
        """One turn of a piece's episodes from their cache: prefill each row's new ids, then decode."""
        engine = self.engine
        suffixes = []
        for held, ctx in zip(piece.held, contexts):
            if ctx[: len(held)] != held or len(ctx) == len(held):
                raise ValueError("an episode's context must extend the one of its previous turn with new ids")
            suffixes.append(ctx[len(held):])
        greedy = temperature == 0
        temperature = 1.0 if greedy else temperature
        side = "left" if piece.cache is None else "right"  # a fresh cache: contexts as one left-padded prompt batch
        if piece.cache is None:
            piece.cache = DynamicCache(config=self.config)
            piece.mask = torch.zeros(len(contexts), 0, dtype=torch.long, device=self.device)
        else:
            self._compact(piece)
        new = _pad(suffixes, engine.pad, torch.long, side).to(self.device)
        new_mask = _pad([[1] * len(x) for x in suffixes], 0, torch.long, side).to(self.device)
        pos = (piece.mask.sum(-1, keepdim=True) + new_mask.cumsum(-1) - 1).clamp(min=0)  # the plain forward's
        last = new_mask.sum(-1) - 1 if side == "right" else None  # each row's last real token
        mask = torch.cat([piece.mask, new_mask], dim=1)
        logits = engine._step(new, mask, pos, piece.cache, temperature, last)
        roll, mask = engine._decode(logits, piece.cache, mask, max_new_tokens, greedy, temperature, top_p, generator,
                                    sharded)
        piece.held = [list(c) for c in contexts]
        self._record(piece, roll, mask, piece.mask.size(1) + new.size(1))
        return roll

    @staticmethod
    def _compact(piece: _Piece) -> None:
        """Gather each row's cached tokens to the right, left-padded to the row that holds most: the masked columns
        a turn leaves (tokens fed after an <eos>, the padding of shorter tool turns, rows of ended episodes) go, so the
        next turn attends over, and copies as the cache grows, its contexts' width (a re-prefill's left-padded
        contexts), not the sum of every turn's longest row. The keys keep their positions (rotary: applied already)."""
        real = piece.mask.bool()
        t, width = real.size(1), int(real.sum(-1).max())
        layers = getattr(piece.cache, "layers", None)
        if width == t or layers is None:
            return
        cols = torch.arange(t, device=real.device).expand_as(real)
        order = torch.where(real, cols, -1).sort(-1).values[:, t - width:]  # -1 (padding) first, then the columns
        index = order.clamp(min=0)
        for layer in layers:
            at = index[:, None, :, None].expand(-1, layer.keys.size(1), -1, layer.keys.size(-1))
            layer.keys, layer.values = layer.keys.gather(2, at), layer.values.gather(2, at)
        piece.mask = (order >= 0).to(piece.mask.dtype)

    def _record(self, piece: _Piece, roll: Rollout, mask: torch.Tensor, width: int) -> None:
        """After a piece's turn: its cache's mask, and each row's held tokens extended by the ones decoding fed."""
        piece.mask = mask
        fed = mask[:, width:].sum(-1).tolist()
        piece.held = [h + roll.completion_ids[r, :k].tolist() for r, (h, k) in enumerate(zip(piece.held, fed))]

    def _idle(self, max_new_tokens: int, sharded: bool) -> None:
        """A piece with nothing to sample, for the forward passes this process must take with the others (FSDP2)."""
        engine = self.engine
        ids = torch.full((1, 1), engine.pad, dtype=torch.long, device=self.device)
        mask = torch.ones_like(ids)
        cache = DynamicCache(config=self.config)
        logits = engine._step(ids, mask, torch.zeros_like(ids), cache, 1.0)
        engine._decode(logits, cache, mask, max_new_tokens, True, 1.0, 1.0, None, sharded,
                       done=torch.ones(1, dtype=torch.bool, device=self.device))


def _pad(rows: list[list[int]], value: int, dtype: torch.dtype, side: str) -> torch.Tensor:
    return torch.nn.utils.rnn.pad_sequence([torch.tensor(r, dtype=dtype) for r in rows], batch_first=True,
                                           padding_value=value, padding_side=side)
