"""The rollouts layer: what a LightningModule that samples from its policy calls (RLVR, on-policy distillation; online
DPO next), with its policy, engine and random generator. Sampling (one completion, or multi-turn episodes with
tools, on either engine), the log-probs of the sampled tokens under any model in the step's micro-batches, scoring
(a verifier, a reward model, an environment's own reward), the gather across processes, the batch's advantages over
every process's groups (by a registered estimator, src/rl/advantages.py) and a step's metrics reduced over them. No
loss here: each algorithm's is its own."""

from __future__ import annotations

import torch

from genlight.envs.episodes import (
    Episodes,
    environment_metrics,
    environment_rewards,
    left_padded,
    reset_groups,
    run_episodes,
)
from genlight.models.lm import causal_lm, check_positions
from genlight.models.logps import completion_logps
from genlight.models.rollout import Rollout, RolloutEngine
from genlight.rewards import passes, score
from genlight.rl.advantages import compute_advantages, truncation_rewards, zero_variance
from genlight.rl.planner import even_out, plan_micro_batches

STAGES = {"train": 0, "val": 1, "test": 2}


def gather(module, x: torch.Tensor) -> torch.Tensor:
    """Concatenate a per-process tensor over processes along dim 0 (identity on one process)."""
    if module.trainer.world_size == 1:
        return x
    return module.all_gather(x).flatten(0, 1)


def batch_advantages(module, estimator: str, r: torch.Tensor, raw: torch.Tensor | None = None,
                     lengths: torch.Tensor | None = None, *, filtered: bool = True) -> dict[str, torch.Tensor]:
    """The advantages of this process's (B, G) rewards `r` from statistics over the whole batch (every process's
    groups): `estimator`'s (`compute_advantages`, with each sample's completion `lengths`), groups whose rewards tie
    (judged on `raw`, default `r`) dropped when `filtered`. Returns this process's "adv" and "keep" (B, G) / (B,),
    and the whole batch's "rewards_all", "keep_all", "zero_variance_all"."""
    b = r.size(0)
    r_all = gather(module, r)
    zv_all = zero_variance(gather(module, raw) if raw is not None else r_all)
    keep_all = ~zv_all if filtered else torch.ones_like(zv_all)
    adv_all = compute_advantages(estimator, r_all, keep_all, None if lengths is None else gather(module, lengths))
    lo = module.global_rank * b if module.trainer.world_size > 1 else 0
    return {"adv": adv_all[lo : lo + b], "keep": keep_all[lo : lo + b], "rewards_all": r_all, "keep_all": keep_all,
            "zero_variance_all": zv_all}


def sampling_generator(seed: int, stage: str, step: int, rank: int, device) -> torch.Generator:
    """Sampling noise as a function of (seed, stage, step, rank): a resumed run draws the same."""
    key = ((seed * 1_000_003 + STAGES[stage]) * 1_000_003 + step) * 1_009 + rank
    return torch.Generator(device=device).manual_seed(key % 2**63)


def sample(engine: RolloutEngine, tokenizer, model, batch: dict, n: int, *, max_new_tokens: int, temperature: float,
           top_p: float, generator: torch.Generator, env=None) -> tuple[Rollout, list[str]]:
    """`n` samples of each prompt of `batch` from `engine` (the weights it holds; `model` gives the positions' limit
    and the device): one completion each, or with `env` an episode each (`episodes`). Returns the rollout and the
    texts the verifier scores (the completions; an episode's final answers)."""
    if env is not None:
        roll = episodes(engine, tokenizer, model, env, batch, n, max_new_tokens=max_new_tokens,
                        temperature=temperature, top_p=top_p, generator=generator)
        return roll, roll.answers
    check_positions(model, batch["prompt_input_ids"].size(1), max_new_tokens, "algo.max_new_tokens")
    roll = engine.generate(batch["prompt_input_ids"], batch["prompt_attention_mask"], n, max_new_tokens, temperature,
                           top_p, generator)
    return roll, tokenizer.batch_decode(roll.completion_ids, skip_special_tokens=True)


def episodes(engine: RolloutEngine, tokenizer, model, env, batch: dict, n: int, *, max_new_tokens: int,
             temperature: float, top_p: float, generator: torch.Generator) -> Episodes:
    """Multi-turn: `n` episodes per prompt, each with its own environment reset on its row (`reset_groups`: a game
    seeded from the row is the same game for a group, and again on resume). The prompts, rendered again with the
    tools' schemas and the reset text, replace the batch's prompt tensors in place (the trainer encodes what the
    sampler saw). The environments' `get_reward` go to `Episodes.env_rewards`."""
    if "chats" not in batch:
        raise ValueError("env: multi-turn episodes start from prompt rows (data.kind=prompt)")
    device = batch["prompt_input_ids"].device
    columns = batch.get("columns") or [{}] * len(batch["chats"])
    prompts, envs = reset_groups(env, tokenizer, batch["chats"], batch["references"], batch["index"].tolist(),
                                 columns, n)
    ids, mask = left_padded(prompts, tokenizer.pad_token_id)
    check_positions(model, ids.size(1), env.max_tokens, "env.max_tokens")
    batch["prompt_input_ids"], batch["prompt_attention_mask"] = ids.to(device), mask.to(device)
    try:
        ep = run_episodes(engine, tokenizer, prompts, envs, n, env.max_turns, max_new_tokens, env.max_tokens,
                          temperature, top_p, generator)
        ep.env_rewards, ep.env_metrics = environment_rewards(envs), environment_metrics(envs)
    finally:
        for e in envs:
            e.close()
    return ep.to(device)


def score_samples(module, prompts: list[str], answers: list[str], texts: list[str], truncated: torch.Tensor,
                  scores: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, int]:
    """(N,) rewards, (N,) passes and the count of verifier errors of `texts` (the `N / len(prompts)` samples of each
    prompt, prompt-major). The rewards are `module.verifier`'s, or `module.reward`'s when it is a reward model
    (scored in batches on this device, its running statistics updated while training), or the environment's own
    `scores`; truncated samples get `truncated_reward` (a number: in the reward's raw units, before a reward model's
    whitening; min: the lowest reward of the step over all processes). A sample passes by `passes`: the verifier's
    score against `pass_threshold`; with truncated_reward set, a truncated sample never passes. One definition for
    train/pass_rate, val/pass@k and eval.py's. Reads `module.hparams` truncated_reward, pass_threshold and
    reward_on_error."""
    hp = module.hparams
    g = len(texts) // len(prompts)
    prompts, answers = [x for x in prompts for _ in range(g)], [x for x in answers for _ in range(g)]
    if scores is None:
        v, errors = score(module.verifier, prompts, texts, answers, hp.reward_on_error)
    else:
        v, errors = scores, 0
    v = torch.as_tensor(v, dtype=torch.float32, device=module.device)
    if hasattr(module.reward, "score_batch"):
        raw_units = hp.truncated_reward if hp.truncated_reward != "min" else None
        r = module.reward.score_batch(prompts, texts, answers, update=module.training, truncated=truncated,
                                      truncated_reward=raw_units, verifier_scores=v).float()
        value = "min" if hp.truncated_reward == "min" else None  # a number is in r already
    else:
        r, value = v, hp.truncated_reward
    floor = gather(module, r).min() if value == "min" and r.numel() else None  # every process calls the gather
    r = truncation_rewards(r, truncated, value, floor)
    return r, passes(v, truncated, hp.pass_threshold, hp.truncated_reward is not None), errors


def check_micro_batches(micro_batch_size: int | None, max_tokens_per_micro_batch: int | None = None,
                        longest: int = 0, budget_key: str = "algo.max_new_tokens") -> None:
    """`algo.micro_batch_size` holds at least one sample, and `algo.max_tokens_per_micro_batch` one sample at its
    longest: 1 prompt token + `longest` completion tokens (set by `budget_key`)."""
    if micro_batch_size is not None and micro_batch_size < 1:
        raise ValueError(f"algo.micro_batch_size={micro_batch_size}: must be >= 1 sample (or null: the whole step)")
    if max_tokens_per_micro_batch is not None and max_tokens_per_micro_batch < longest + 1:
        raise ValueError(f"algo.max_tokens_per_micro_batch={max_tokens_per_micro_batch} cannot hold one sample: "
                         f"a sample can be a prompt + {budget_key}={longest} tokens")


def plan(module, prompt_mask: torch.Tensor, lengths: torch.Tensor, g: int, micro_batch_size: int | None,
         max_tokens: int | None) -> list[tuple[int, int]]:
    """The step's micro-batches (`genlight.rl.planner`): as many on every process, the most any plans."""
    prompt_len, comp_len = prompt_mask.sum(-1).repeat_interleave(g).tolist(), lengths.tolist()
    ranges = plan_micro_batches(prompt_len, comp_len, micro_batch_size, max_tokens)
    count = int(gather(module, torch.tensor([len(ranges)], device=prompt_mask.device)).max())
    return even_out(ranges, count, prompt_len, comp_len)


def micro_batch(batch: dict, roll: Rollout, g: int, s: int, e: int, temperature: float) -> tuple:
    """`completion_logps`'s arguments for samples [s, e): whole groups share their prompt's encoding; a range
    that splits a group encodes the prompt once per sample. Columns that are padding in every row are cut."""
    ids, pmask = batch["prompt_input_ids"], batch["prompt_attention_mask"]
    if s % g == 0 and e % g == 0:
        ids, pmask, group = ids[s // g : e // g], pmask[s // g : e // g], g
    else:
        rows = torch.arange(s, e, device=ids.device) // g
        ids, pmask, group = ids[rows], pmask[rows], 1
    first = int(pmask.any(0).long().argmax())  # prompts are left-padded
    cmask = roll.completion_mask[s:e]
    t = max(int(cmask.sum(-1).max()), 1)
    return ids[:, first:], pmask[:, first:], roll.completion_ids[s:e, :t], cmask[:, :t], temperature, group


def shares_prompt_cache(model) -> bool:
    """Whether a training pass through `model` encodes a group's prompt once for its samples (`completion_hidden`):
    not under gradient checkpointing while it trains (transformers drops the shared cache)."""
    return not (causal_lm(model).is_gradient_checkpointing and model.training)


def encoded_tokens(prompt_mask: torch.Tensor, lengths: torch.Tensor, g: int, ranges: list[tuple[int, int]],
                   shared_cache: bool = True) -> int:
    """The tokens a pass over micro-batches `ranges` runs through a model (its FLOPs: 2 N a token forward, 6 N
    trained): a micro-batch of whole groups encodes each prompt once for its `g` samples (with `shared_cache`), one
    that splits a group once per sample; every completion token once."""
    per_prompt = prompt_mask.sum(-1).tolist()
    total = int(lengths.sum())
    for s, e in ranges:
        if s % g == 0 and e % g == 0 and (shared_cache or g == 1):
            total += sum(per_prompt[s // g : e // g])
        else:
            total += sum(per_prompt[i // g] for i in range(s, e))
    return total


@torch.no_grad()
def sampled_logps(model, batch: dict, roll: Rollout, ranges: list[tuple[int, int]], temperature: float
                  ) -> torch.Tensor:
    """log-probs (N, T) of every sampled token under `model` (the reference, the generator, a teacher), in the step's
    micro-batches, without gradients."""
    out = torch.zeros_like(roll.logps)
    g = roll.logps.size(0) // batch["prompt_input_ids"].size(0)
    for s, e in ranges:
        seqs = micro_batch(batch, roll, g, s, e, temperature)
        out[s:e, : seqs[2].size(1)] = completion_logps(model, *seqs, with_entropy=False)[0]
    return out


# TRL's names keep TRL's reduction over processes: the mean of the processes' means (`accelerator.gather(...).mean()`)
TRL_MEAN_OF_MEANS = ("sampling/importance_sampling_ratio/mean", "sampling/sampling_logp_difference/mean")


def across_processes(module, log: dict, r: torch.Tensor, mask: torch.Tensor, is_level: str = "token"
                     ) -> dict[str, torch.Tensor]:
    """This process's step metrics (`log`) as values over all processes (identity on one; `module` gives the trainer
    and device): a `/max` the largest, a `/min` the smallest, `reward_errors` the sum, `loss` the processes' mean (DDP
    averages their gradients), `reward/std` the std of all rewards, TRL's `TRL_MEAN_OF_MEANS` as TRL reduces them;
    every other mean is weighted by its units: the tokens (entropy, rho, logp_diff, kl, sampling/* per token), the sequences
    (sampling/* with `is_level` sequence) or the samples."""
    if module.trainer.world_size == 1:
        return log
    n_tok, n_seq, n_smp = mask.sum(), mask.any(-1).sum(), r.new_tensor(float(r.numel()))
    per_token = ("entropy", "logp_diff/", "rho/", "kl", "sampling/sampling_logp_difference/")
    units = n_seq if is_level == "sequence" else n_tok  # of sampling/* from `is_weights`
    keys = list(log)
    vals = torch.stack([torch.as_tensor(log[k], dtype=torch.float64, device=module.device) for k in keys])
    weights = []
    for k in keys:
        if k.endswith(("/max", "/min")) or k in ("loss", "reward_errors") or k in TRL_MEAN_OF_MEANS:
            weights.append(1.0)
        elif k.startswith(per_token):
            weights.append(n_tok)
        elif k.startswith("sampling/"):
            weights.append(units)
        else:
            weights.append(n_smp)
    w = torch.stack([torch.as_tensor(x, dtype=torch.float64, device=module.device) for x in weights])
    moments = torch.stack([r.double().sum(), (r.double() ** 2).sum(), n_smp.double()])
    all_ = gather(module, torch.cat([vals, w, moments]).view(1, -1))  # (world, 2 K + 3): one collective
    v_all, w_all, (s1, s2, n) = all_[:, : len(keys)], all_[:, len(keys) : 2 * len(keys)], all_[:, -3:].sum(0)
    out = {}
    for i, k in enumerate(keys):
        if k.endswith("/max"):
            out[k] = v_all[:, i].max()
        elif k.endswith("/min"):
            out[k] = v_all[:, i].min()
        elif k == "reward_errors":
            out[k] = v_all[:, i].sum()
        else:
            out[k] = (v_all[:, i] * w_all[:, i]).sum() / w_all[:, i].sum().clamp(min=1e-12)
    out["reward/std"] = ((s2 - s1**2 / n) / (n - 1).clamp(min=1)).clamp(min=0).sqrt()
    return {k: v.float() for k, v in out.items()}
