"""rollout=vllm: the colocated vLLM engine against HFRollout and the trainer, weight sync, LoRA, a full run.

The engines of this module share one in-process `vllm.LLM` (same architecture and settings): it is built
once (~15 s on 2 cores) and every test pushes its own weights into it, which is what the engine does in
training too. `make test` installs vLLM first (`make install-vllm`, which marks the environment with `.vllm`), so CI
runs this module; in an environment so marked, a vLLM that fails to import fails the module instead of skipping it.
"""

from __future__ import annotations

import csv
import sys
from pathlib import Path

import pytest
import torch

from genlight.models.logps import completion_logps
from tests.helpers import RLVR_RUN, train_with

if (Path(sys.prefix) / ".vllm").exists():  # `make install-vllm` installed it here (make test does): it must import
    import vllm
else:
    vllm = pytest.importorskip("vllm", reason="rollout=vllm tests need vLLM: make install-vllm")


def _prompts(tokenizer, texts):
    from genlight.datamodules.lm import pad

    ids = [tokenizer(t)["input_ids"] for t in texts]
    return pad(ids, tokenizer.pad_token_id, left=True), pad([[1] * len(i) for i in ids], 0, left=True)


PROMPTS = ["12+3=", "1+1=", "45+67=", "9+90="]


def _engines(model, tokenizer):
    from genlight.models.rollout import HFRollout
    from genlight.models.rollout_vllm import VLLMRollout

    eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id
    return HFRollout(model, eos, pad), VLLMRollout(model, eos, pad, max_model_len=128)


def _greedy(engine, ids, mask, n=12):
    roll = engine.generate(ids, mask, 1, n, 1.0, 1e-9, torch.Generator().manual_seed(0))
    return [row[m].tolist() for row, m in zip(roll.completion_ids, roll.completion_mask)]


def test_vllm_greedy_equals_hf_and_its_logps_are_the_trainers(tokenizer):
    from genlight.models import tiny_llama

    model = tiny_llama(tokenizer, seed=0)
    ids, mask = _prompts(tokenizer, PROMPTS)
    hf, vl = _engines(model, tokenizer)
    assert _greedy(vl, ids, mask) == _greedy(hf, ids, mask)
    roll = vl.generate(ids, mask, 4, 10, 1.0, 1.0, torch.Generator().manual_seed(1))
    assert roll.completion_ids.shape[0] == 16 and roll.completion_mask[:, 0].all()
    for row, m, trunc in zip(roll.completion_ids, roll.completion_mask, roll.truncated):
        n = int(m.sum())
        assert m[:n].all() and not m[n:].any()
        assert bool(trunc) == (row[n - 1] != tokenizer.eos_token_id)
    assert len({tuple(r.tolist()) for r in roll.completion_ids}) > 8, "the 16 samples are not independent draws"
    # log pi_gen recorded by vLLM's sampler vs log pi_train recomputed by the trainer on the same tokens. Both
    # are float32 here; only the kernels differ (vLLM's CPU attention and GEMMs vs PyTorch's), so the two agree
    # to float32 rounding accumulated over 4 layers: 1e-4 is 100x the differences seen (~1e-6), and 1e-2 below
    # what a real mismatch (wrong position, wrong token, wrong temperature) gives.
    with torch.no_grad():
        logp, _ = completion_logps(model, ids, mask, roll.completion_ids, roll.completion_mask, 1.0, group=4)
    m = roll.completion_mask
    assert (logp - roll.logps)[m].abs().max() < 1e-4
    # temperature: the sampler's log-probs are those of the tempered distribution
    hot = vl.generate(ids, mask, 2, 6, 0.7, 1.0, torch.Generator().manual_seed(2))
    with torch.no_grad():
        logp7, _ = completion_logps(model, ids, mask, hot.completion_ids, hot.completion_mask, 0.7, group=2)
    assert (logp7 - hot.logps)[hot.completion_mask].abs().max() < 1e-4
    # seeded: the same generator draws the same samples (a resumed run samples what the first one did)
    again = vl.generate(ids, mask, 4, 10, 1.0, 1.0, torch.Generator().manual_seed(1))
    assert torch.equal(again.completion_ids, roll.completion_ids)


def test_weight_sync_reaches_the_live_engine_without_a_reload(tokenizer):
    from genlight.models import rollout_vllm, tiny_llama

    model = tiny_llama(tokenizer, seed=0)
    ids, mask = _prompts(tokenizer, PROMPTS)
    hf, vl = _engines(model, tokenizer)
    before = _greedy(vl, ids, mask)
    llm, pushes = vl.llm, vl.pushes
    assert _greedy(vl, ids, mask) == before and vl.pushes == pushes, "unchanged weights are not pushed again"
    vl.load_weights(tiny_llama(tokenizer, seed=1).state_dict())  # what a pi_gen refresh does
    after = _greedy(vl, ids, mask)
    assert after == _greedy(hf, ids, mask), "the engine does not sample from the new weights"
    assert after != before
    assert vl.pushes == pushes + 1 and vl.llm is llm and len(rollout_vllm._engines) == 1, "the engine was rebuilt"
    # the model changed in place (an optimizer step on the policy): its own state marks the engine stale
    opt = torch.optim.AdamW(model.parameters(), lr=0.05, fused=True)
    roll = vl.generate(ids, mask, 1, 4, 1.0, 1.0, torch.Generator().manual_seed(0))
    completion_logps(model, ids, mask, roll.completion_ids, roll.completion_mask)[0].sum().backward()
    opt.step()
    stale = _greedy(vl, ids, mask)
    vl.load_weights(model.state_dict())
    assert _greedy(vl, ids, mask) == _greedy(hf, ids, mask) != stale


def test_lora_policy_is_served_merged(tokenizer):
    from genlight.lightning_modules.lm import policy
    from genlight.models import tiny_llama

    model = policy(tiny_llama(tokenizer, seed=0), {"r": 4, "alpha": 8, "dropout": 0.0, "target_modules": "all-linear"})
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.2)  # adapters that change the greedy answers (B = 0 at init would not)
    ids, mask = _prompts(tokenizer, PROMPTS)
    hf, vl = _engines(model.eval(), tokenizer)
    with model.disable_adapter():
        base = _greedy(hf, ids, mask)
    adapted = _greedy(hf, ids, mask)
    assert adapted != base
    assert _greedy(vl, ids, mask) == adapted


def test_rlvr_runs_on_vllm_and_logs_the_train_inference_drift(cfg_factory):
    cfg = cfg_factory(*RLVR_RUN, "rollout=vllm", "rollout.max_model_len=128", "trainer.max_steps=4",
                      "algo.generation_lag=0", "loss=dapo")
    _, objs = train_with(cfg)
    module, metrics = objs["module"], objs["trainer"].callback_metrics
    assert type(module.engine).__name__ == "VLLMRollout" and module.eval_engine is module.engine
    # on-policy: rho = pi_train / pi_gen is 1 up to the kernels' difference, which logp_diff reports
    assert 0 < float(metrics["train/logp_diff/max"]) < 1e-3
    assert float(metrics["train/logp_diff/mean"]) <= float(metrics["train/logp_diff/max"])
    assert "val/pass@1" in metrics


def test_is_correction_weighs_the_engines_own_logps(cfg_factory, monkeypatch):
    """algo.is_correction=tis on vLLM with a lag: the correction's pi_rollout is the engine's log-probs as sampled,
    pi_old is the trainer's recompute of the same weights, and the logged mismatch between them is the kernels'
    (nonzero, small); the loss's ratio pi_train / pi_old then holds only the lag."""
    import genlight.lightning_modules.rlvr as rlvr
    from genlight.models.rollout_vllm import VLLMRollout

    sampled, seen = [], []
    generate, weights = VLLMRollout.generate, rlvr.is_weights
    monkeypatch.setattr(VLLMRollout, "generate", lambda self, *a, **k: sampled.append(generate(self, *a, **k)) or sampled[-1])
    monkeypatch.setattr(rlvr, "is_weights", lambda old, roll, *a: seen.append((old, roll)) or weights(old, roll, *a))
    cfg = cfg_factory(*RLVR_RUN, "rollout=vllm", "rollout.max_model_len=128", "trainer.max_steps=4",
                      "trainer.val_check_interval=null", "+trainer.limit_val_batches=0", "algo.generation_lag=2",
                      "algo.is_correction=tis")
    _, objs = train_with(cfg)
    metrics = objs["trainer"].callback_metrics
    assert len(seen) == 4 and len(sampled) == 4
    for (old, roll), s in zip(seen, sampled):
        assert torch.equal(roll, s.logps)  # the engine's numbers, untouched
        diff = (old - roll)[s.completion_mask].abs()
        assert 0 < float(diff.max()) < 1e-3
    assert 0 < float(metrics["train/sampling/sampling_logp_difference/max"]) < 1e-3
    assert float(metrics["train/sampling/importance_sampling_ratio/mean"]) == pytest.approx(1.0, abs=1e-3)


def test_rlvr_on_vllm_resumes_exactly(cfg_factory, tmp_path):
    """The lagged pi_gen comes back from the checkpoint and is pushed into the engine before its first sample."""
    from tests.helpers import SHORT
    from tests.helpers.resume import PER_EPOCH, TOTAL, check_resume_exactly

    check_resume_exactly(cfg_factory, tmp_path, "rlvr_vllm", [*SHORT["rlvr"], "algo.micro_batch_size=3", "rollout=vllm",
                                                             "rollout.max_model_len=128"], True, TOTAL, PER_EPOCH)


def test_each_ddp_process_samples_with_its_own_engine(tmp_path):
    """trainer=ddp, 2 CPU processes: each builds its engine inside the trainer's process group. A subprocess:
    the engines of this module left a one-process group initialised in the pytest process."""
    from tests.helpers import run_cli

    out = run_cli(*RLVR_RUN, "rollout=vllm", "rollout.max_model_len=128", "trainer.max_steps=3", "logger=csv", "trainer.log_every_n_steps=1",
                  "trainer=ddp", "trainer.accelerator=cpu", "trainer.devices=2", "trainer.strategy=ddp_fork",
                  "data.batch_size=2", tmp=tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    (path,) = tmp_path.glob("**/metrics.csv")
    rows = list(csv.DictReader(path.open()))
    assert sum(bool(r["train/logp_diff/mean"]) for r in rows) == 3 and any(r["val/pass@1"] for r in rows)


def test_fsdp2_pushes_gathered_weights_into_each_engine(tmp_path):
    """trainer=fsdp (2 CPU processes): the sharded policy and lagged generator are gathered tensor by tensor
    into each process's engine. Right after a refresh (steps 0 and 3, generation_lag 3) pi_gen == pi_train,
    so |log pi_train - log pi_gen| is float32 noise only if the gathered weights are the trainer's."""
    from tests.test_fsdp import _fsdp

    run = _fsdp(tmp_path, "rlvr", "rollout=vllm", "rollout.max_model_len=128", "trainer.max_steps=4",
                "trainer.log_every_n_steps=1")
    rows = list(csv.DictReader((run / "csv" / "version_0" / "metrics.csv").open()))
    drift = {int(r["step"]): float(r["train/logp_diff/max"]) for r in rows if r.get("train/logp_diff/max")}
    assert sorted(drift) == [0, 1, 2, 3]
    assert drift[0] < 1e-4 and drift[3] < 1e-4
    assert max(drift[1], drift[2]) > 1e-3, "the lagged pi_gen should differ from the updated policy in between"


def test_unsupported_head_dimension_names_the_model(tokenizer):
    from genlight.models import tiny_llama
    from genlight.models.rollout_vllm import VLLMRollout

    model = tiny_llama(tokenizer, hidden_size=96, num_heads=4)  # head dimension 24
    with pytest.raises(ValueError, match=r"LlamaConfig.*head dimension 24.*rollout=hf"):
        VLLMRollout(model, tokenizer.eos_token_id, tokenizer.pad_token_id)


def test_rollout_vllm_without_vllm_names_the_install_command(cfg_factory, monkeypatch):
    monkeypatch.setitem(sys.modules, "vllm", None)  # `import vllm` now raises ImportError, as when absent
    from genlight.pipeline import train

    cfg = cfg_factory(*RLVR_RUN, "rollout=vllm")
    with pytest.raises(ImportError, match=r"rollout=vllm needs vLLM.*make install-vllm"):
        train(cfg)  # at once: before the warm start, data or model


def test_engines_agree_at_temperature_0_and_record_the_nucleus_they_sample_from(tokenizer):
    """temperature 0 is greedy in both engines: the same tokens and the same log-probs (the untempered
    distribution's, vLLM's convention). With top_p < 1 vLLM records the log-probs of the renormalised nucleus it drew
    from, which `nucleus_logprobs` (the HF engine's) computes from the trainer's own logits; RL refuses top_p < 1
    (tests/test_rlhf.py), since the trainer scores the full distribution."""
    from genlight.models import tiny_llama
    from genlight.models.rollout import nucleus_logprobs

    model = tiny_llama(tokenizer, seed=3)
    ids, mask = _prompts(tokenizer, PROMPTS)
    hf, vl = _engines(model, tokenizer)
    a = hf.generate(ids, mask, 2, 10, 0.0, 1.0, torch.Generator().manual_seed(0))
    b = vl.generate(ids, mask, 2, 10, 0.0, 1.0, torch.Generator().manual_seed(0))
    assert torch.equal(a.completion_ids, b.completion_ids) and torch.equal(a.completion_mask, b.completion_mask)
    assert (a.logps - b.logps).abs().max() < 1e-4
    assert torch.equal(a.completion_ids[0], a.completion_ids[1])  # greedy: the group's samples are the same
    roll = vl.generate(ids, mask, 4, 6, 0.8, 0.7, torch.Generator().manual_seed(1))
    seq = torch.cat([ids.repeat_interleave(4, 0), roll.completion_ids], 1)
    att = torch.cat([mask.repeat_interleave(4, 0), roll.completion_mask.long()], 1)
    with torch.no_grad():
        logits = model(input_ids=seq, attention_mask=att, position_ids=(att.cumsum(-1) - 1).clamp(min=0)).logits
    lp = nucleus_logprobs(logits[:, ids.size(1) - 1 : -1].float() / 0.8, 0.7)
    want = lp.gather(-1, roll.completion_ids.unsqueeze(-1)).squeeze(-1)
    m = roll.completion_mask
    assert (want - roll.logps)[m].abs().max() < 1e-4
    full = torch.log_softmax(logits[:, ids.size(1) - 1 : -1].float() / 0.8, -1)
    assert ((roll.logps - full.gather(-1, roll.completion_ids.unsqueeze(-1)).squeeze(-1))[m] > 1e-3).all()


def test_multi_turn_episodes_on_vllm_keep_the_sampled_ids_and_their_logps(tokenizer, monkeypatch):
    """run_episodes on the vLLM engine (every finished turn calls a tool that echoes): the tool turns sit between the
    policy's turns, out of the policy mask, and vLLM's sampler log-probs are the trainer's on the policy's tokens."""
    import genlight.envs.episodes as episodes
    from genlight.envs.episodes import run_episodes, tool_turn_text
    from genlight.envs.tools import Environment, ToolCall
    from genlight.models import tiny_llama
    from tests.helpers import echo

    monkeypatch.setattr(episodes, "parse_tool_calls", lambda text: [ToolCall("echo", {"x": "ok"})])
    model = tiny_llama(tokenizer, seed=0)
    _, vl = _engines(model, tokenizer)
    prompts = [tokenizer(f"<|user|>{q}\n<|assistant|>").input_ids for q in ("1+2", "30+4")]
    envs = [Environment(tools=[echo]) for _ in range(4)]
    ep = run_episodes(vl, tokenizer, prompts, envs, num_samples=2, max_turns=2, max_new_tokens=12, max_tokens=48,
                      generator=torch.Generator().manual_seed(0))
    tool = tokenizer(tool_turn_text(tokenizer, [("echo", "ok")]), add_special_tokens=False).input_ids
    took = 0
    for ids, pm, cm in zip(ep.completion_ids, ep.policy_mask, ep.completion_mask):
        tool_at = (~pm & cm).nonzero().flatten().tolist()
        if tool_at:  # the first turn ended with <eos>, then exactly the template's tool turn
            took += 1
            assert ids[tool_at[0] - 1] == tokenizer.eos_token_id and ids[tool_at].tolist() == tool
    assert took, "no episode took a tool turn: the test would not bite"
    from tests.helpers import episode_logps

    logp = episode_logps(model, tokenizer.pad_token_id, prompts, ep)
    m = ep.policy_mask
    assert (logp - ep.logps)[m].abs().max() < 1e-4  # as single-turn above: float32 rounding only


def test_episodes_on_vllm_find_their_context_in_the_prefix_cache(tokenizer, monkeypatch):
    """vLLM is built with prefix caching on (the engine's own config says so), and the turn after a tool call finds
    the KV blocks of its context in it: every request of turn 2 reports at least one full block (128 tokens on CPU)
    of cached prompt tokens (the first request of each prompt in turn 2 can only have found turn 1's). The prefix
    cache is reset at the weight push before turn 1 and never between the turns."""
    import genlight.envs.episodes as episodes
    from genlight.envs.episodes import run_episodes
    from genlight.envs.tools import Environment, ToolCall
    from genlight.models import tiny_llama
    from genlight.models.rollout_vllm import VLLMRollout
    from tests.helpers import echo

    monkeypatch.setattr(episodes, "parse_tool_calls", lambda text: [ToolCall("echo", {"x": "ok"})])
    model = tiny_llama(tokenizer, seed=0)
    vl = VLLMRollout(model, tokenizer.eos_token_id, tokenizer.pad_token_id, max_model_len=256)
    llm = vl.llm
    assert llm.llm_engine.vllm_config.cache_config.enable_prefix_caching is True
    block = llm.llm_engine.vllm_config.cache_config.block_size
    outputs, resets = [], []
    generate, reset = llm.generate, llm.reset_prefix_cache
    monkeypatch.setattr(llm, "generate", lambda *a, **k: outputs.append(generate(*a, **k)) or outputs[-1])
    monkeypatch.setattr(llm, "reset_prefix_cache", lambda *a, **k: resets.append(len(outputs)) or reset(*a, **k))
    filler = " ".join(f"{i}+{i}={2 * i}." for i in range(14))  # a prompt over one block: ~140 tokens
    prompts = [tokenizer(f"<|user|>{q} {filler}\n<|assistant|>").input_ids for q in ("1+2", "30+4", "7+15", "2+2")]
    assert all(block < len(p) < 2 * block for p in prompts)
    envs = [Environment(tools=[echo]) for _ in range(8)]
    ep = run_episodes(vl, tokenizer, prompts, envs, num_samples=2, max_turns=2, max_new_tokens=24, max_tokens=80,
                      generator=torch.Generator().manual_seed(0))
    assert int((ep.turns == 2).sum()) >= 2, "few episodes took a second turn: the test would not bite"
    assert resets == [0] and vl.pushes == 1  # the push before turn 1, none between the turns
    _, second = outputs
    assert len(second) == int((ep.turns == 2).sum()) and all(o.num_cached_tokens >= block for o in second)
