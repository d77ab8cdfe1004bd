"""Peak memory (RSS) of one optimizer step at a real vocabulary: ours against TRL on the same work.

    OMP_WAIT_POLICY=PASSIVE python bench/memory.py [--rounds 3] [--only rlvr,sft,dpo]

The model is what a real checkpoint's LM head looks like at small scale: a Qwen2 with Qwen2.5's vocabulary
(151,936 rows), hidden 128, 2 layers, 4 heads of 32 (2 KV heads), tied embeddings (19.8 M parameters, almost all
of them the embedding), random weights, built here and saved as an ordinary HF directory with a character-level
tokenizer padded with filler tokens to the same 151,936 entries. The data is generated here (JSONL files).

Each run is its own process (`train.py ...` for ours, a short TRL script for the peer), so its peak RSS is its own
(ru_maxrss of the finished child); the runs alternate in every round. Printed beside them: a process that only
imports our stack, and a lower bound: the imports + weights + gradients + Adam's two moments (16 B a parameter).

- RLVR: prompts x 8 samples x 128 new tokens (the random policy never stops early), on-policy, no KL, one step.
  Ours: algo.micro_batch_size=8, rollout.max_batch_size=8, at 16, 64 and 256 samples a step. TRL 1.16
  GRPOTrainer at 64: per_device_train_batch_size=8, gradient_accumulation_steps=8, num_generations=8.
- SFT: 8 sequences x 512 tokens (a 32-token prompt, the rest completion), one step. TRL SFTTrainer, batch 8,
  completion-only loss.
- DPO: 8 pairs, each prompt + completion 512 tokens, one step, the reference a frozen copy on both sides (TRL
  precomputes nothing: precompute_ref_log_probs=False). TRL DPOTrainer, batch 8.
- On-policy distillation: 8 prompts x 1 sample x 128 new tokens, one step, reverse KL (beta 1), the teacher a Qwen2
  of the same vocabulary twice as wide with 4 layers (TEACHER, 42.7 M parameters), fp32. Ours: algo=distill. TRL 1.16
  DistillationTrainer, batch 8, max_completion_length 128. Both with gradient checkpointing off (TRL's default is on:
  measured too, against ours with model.gradient_checkpointing=true).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from machine import cpu_name  # bench/machine.py

ROOT = Path(__file__).resolve().parents[1]
VOCAB = 151_936
RLVR_SAMPLES = (16, 64, 256)
NEW, G, MICRO = 128, 8, 8
SEQ, PAIRS, BATCH = 512, 8, 8


SMALL = dict(hidden_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=32,
             intermediate_size=512)


TEACHER = dict(hidden_size=256, num_hidden_layers=4, num_attention_heads=8, num_key_value_heads=2, head_dim=32,
               intermediate_size=1024)


def build(d: Path, shape: dict = SMALL) -> Path:
    """A Qwen2 of `shape` with the real vocabulary and its tokenizer, saved in `d/model` (random weights); the
    JSONL data beside it."""
    import torch
    from tokenizers import Tokenizer, decoders, models, processors
    from transformers import PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM

    from genlight.models.tokenizer import BOS, CHAT_TEMPLATE, DEFAULT_ALPHABET, EOS, PAD, SPECIALS, UNK

    chars = list(dict.fromkeys(DEFAULT_ALPHABET))
    words = SPECIALS + chars + [f"<|f{i}|>" for i in range(VOCAB - len(SPECIALS) - len(chars))]
    vocab = {w: i for i, w in enumerate(words)}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token=UNK))
    tok.add_special_tokens(SPECIALS)
    tok.post_processor = processors.TemplateProcessing(single=f"{BOS} $A", pair=f"{BOS} $A $B",
                                                       special_tokens=[(BOS, vocab[BOS])])
    tok.decoder = decoders.Fuse()
    hf_tok = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token=PAD, bos_token=BOS, eos_token=EOS, unk_token=UNK,
                                     chat_template=CHAT_TEMPLATE, clean_up_tokenization_spaces=False)
    assert len(hf_tok) == VOCAB
    config = Qwen2Config(vocab_size=VOCAB, **shape, max_position_embeddings=2048, tie_word_embeddings=True,
                         pad_token_id=hf_tok.pad_token_id, bos_token_id=hf_tok.bos_token_id,
                         eos_token_id=hf_tok.eos_token_id)
    torch.manual_seed(0)
    Qwen2ForCausalLM(config).save_pretrained(d / "model")
    hf_tok.save_pretrained(d / "model")
    teacher = Qwen2Config(**{**{k: v for k, v in config.to_dict().items() if k != "layer_types"}, **TEACHER})
    Qwen2ForCausalLM(teacher).save_pretrained(d / "teacher")
    hf_tok.save_pretrained(d / "teacher")

    rng = random.Random(0)
    text = lambda n: "".join(rng.choice("abcdefghij klmnop") for _ in range(n))  # noqa: E731
    rows = [{"prompt": f"{a}+{b}=", "answer": str(a + b)} for a, b in ((rng.randrange(100), rng.randrange(100))
                                                                        for _ in range(512))]
    (d / "prompts.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    # 1 + 32 + 478 = 511 tokens with <s>, plus </s>: 512
    sft = [{"prompt": text(32), "completion": text(SEQ - 34)} for _ in range(64)]
    (d / "sft.jsonl").write_text("".join(json.dumps(r) + "\n" for r in sft))
    pref = [{"prompt": text(32), "chosen": text(SEQ - 34), "rejected": text(SEQ - 34)} for _ in range(64)]
    (d / "pref.jsonl").write_text("".join(json.dumps(r) + "\n" for r in pref))
    return d / "model"


def ours(d: Path, algo: str, samples: int = 0, checkpointing: bool = False) -> list[str]:
    common = ["train.py", "model=hf", f"model.pretrained={d / 'model'}", "trainer.max_steps=1", "test=false",
              "logger=none", "callbacks.hf_export=null", "callbacks.model_checkpoint=null", "trainer.enable_progress_bar=false",
              "extras.print_config=false", "trainer.num_sanity_val_steps=0", "+trainer.limit_val_batches=0",
              "trainer.enable_model_summary=false", "optimized_metric=null", f"hydra.run.dir={d / 'runs' / algo}"]
    if algo == "rlvr":
        return [*common, "algo=rlvr", "data=jsonl_prompts", f"data.source.train={d / 'prompts.jsonl'}",
                f"data.batch_size={samples // G}", f"algo.num_generations={G}", f"algo.max_new_tokens={NEW}",
                "algo.generation_lag=0", "algo.retire_threshold=null", "algo.log_completions_every_n_steps=0",
                f"algo.micro_batch_size={MICRO}", f"rollout.max_batch_size={MICRO}", "reward=exact"]
    if algo == "distill":
        return [*common, "algo=distill", f"teacher.pretrained={d / 'teacher'}", "data=jsonl_prompts",
                f"data.source.train={d / 'prompts.jsonl'}", f"data.batch_size={BATCH}", f"algo.max_new_tokens={NEW}",
                "reward=exact", f"model.gradient_checkpointing={checkpointing}"]
    if algo == "sft":
        return [*common, "algo=sft", "data=jsonl_sft", f"data.source.train={d / 'sft.jsonl'}", f"data.batch_size={BATCH}",
                f"data.max_length={SEQ}"]
    return [*common, "algo=dpo", "data=jsonl_pref", f"data.source.train={d / 'pref.jsonl'}", f"data.batch_size={PAIRS}",
            f"data.max_length={SEQ}", "algo.cache_ref_logps=false"]


TRL = r'''
import sys, tempfile, datasets, torch
from transformers import AutoModelForCausalLM, AutoTokenizer
d, algo = sys.argv[1], sys.argv[2]
torch.manual_seed(0)
model = AutoModelForCausalLM.from_pretrained(d + "/model", local_files_only=True)
tok = AutoTokenizer.from_pretrained(d + "/model", local_files_only=True)
common = dict(output_dir=tempfile.mkdtemp(), max_steps=1, report_to="none", save_strategy="no", use_cpu=True,
              bf16=False, fp16=False, disable_tqdm=True, dataloader_num_workers=0, logging_steps=10**6)
if algo == "rlvr":
    from trl import GRPOConfig, GRPOTrainer
    ds = datasets.load_dataset("json", data_files=d + "/prompts.jsonl", split="train")
    args = GRPOConfig(**common, per_device_train_batch_size=8, gradient_accumulation_steps=8, num_generations=8,
                      max_completion_length=128, temperature=1.0, beta=0.0, loss_type="cispo", epsilon_high=5.0,
                      scale_rewards="batch")
    reward = lambda prompts, completions, answer, **kw: [float(c.strip() == a) for c, a in zip(completions, answer)]
    GRPOTrainer(model=model, reward_funcs=reward, args=args, train_dataset=ds, processing_class=tok).train()
elif algo.startswith("distill"):
    from trl import DistillationConfig, DistillationTrainer
    ds = datasets.load_dataset("json", data_files=d + "/prompts.jsonl", split="train")
    teacher = AutoModelForCausalLM.from_pretrained(d + "/teacher", local_files_only=True)
    args = DistillationConfig(**common, per_device_train_batch_size=8, max_completion_length=128, beta=1.0,
                              temperature=1.0, gradient_checkpointing=algo == "distill_gc")
    DistillationTrainer(model=model, teacher_model=teacher, args=args, train_dataset=ds, processing_class=tok).train()
elif algo == "sft":
    from trl import SFTConfig, SFTTrainer
    ds = datasets.load_dataset("json", data_files=d + "/sft.jsonl", split="train")
    args = SFTConfig(**common, per_device_train_batch_size=8, max_length=512, completion_only_loss=True)
    SFTTrainer(model=model, args=args, train_dataset=ds, processing_class=tok).train()
else:
    from trl import DPOConfig, DPOTrainer
    ds = datasets.load_dataset("json", data_files=d + "/pref.jsonl", split="train")
    args = DPOConfig(**common, per_device_train_batch_size=8, max_length=512, precompute_ref_log_probs=False)
    DPOTrainer(model=model, args=args, train_dataset=ds, processing_class=tok).train()
'''


def peak_rss_mb(args: list[str]) -> float:
    """Run a child Python and return its peak resident set size in MB (Linux: ru_maxrss is in KiB)."""
    code = """
import resource, runpy, sys
sys.argv = sys.argv[1:]
if sys.argv[0] == "-":  # the imports alone
    __import__("train")
elif sys.argv[0] == "-c":  # a script given as text, then its arguments
    sys.argv = sys.argv[1:]
    exec(sys.argv[0])
else:
    runpy.run_path(sys.argv[0], run_name="__main__")
print("RSS", resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
"""
    env = {**os.environ, "PROJECT_ROOT": str(ROOT), "WANDB_MODE": "offline", "HF_HUB_OFFLINE": "1"}
    out = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, cwd=ROOT, env=env)
    if out.returncode != 0:
        sys.exit(f"{' '.join(args)[:300]}\n{out.stderr[-4000:]}")
    line = [ln for ln in out.stdout.splitlines() if ln.startswith("RSS ")][-1]
    return int(line.split()[1]) / 1024


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--only", default="rlvr,sft,dpo,distill")
    a = ap.parse_args()
    only = a.only.split(",")
    print(f"CPU: {cpu_name()}, {os.cpu_count()} cores; peak RSS of one process per run, one optimizer step")
    d = Path(tempfile.mkdtemp(prefix="memory_bench_"))
    build(d)
    from transformers import AutoConfig, Qwen2ForCausalLM

    with __import__("torch").device("meta"):
        params = sum(p.numel() for p in Qwen2ForCausalLM(AutoConfig.from_pretrained(d / "model")).parameters())
    runs = {"imports only (ours)": ["-"]}
    if "rlvr" in only:
        runs |= {f"RLVR ours, {n} samples": ours(d, "rlvr", n) for n in RLVR_SAMPLES}
        runs["RLVR TRL GRPOTrainer, 64 samples"] = ["-c", TRL, str(d), "rlvr"]
    if "sft" in only:
        runs |= {"SFT ours": ours(d, "sft"), "SFT TRL SFTTrainer": ["-c", TRL, str(d), "sft"]}
    if "dpo" in only:
        runs |= {"DPO ours": ours(d, "dpo"), "DPO TRL DPOTrainer": ["-c", TRL, str(d), "dpo"]}
    if "distill" in only:
        runs |= {"distill ours": ours(d, "distill"), "distill TRL DistillationTrainer": ["-c", TRL, str(d), "distill"],
                 "distill ours, checkpointing": ours(d, "distill", checkpointing=True),
                 "distill TRL DistillationTrainer, checkpointing": ["-c", TRL, str(d), "distill_gc"]}
    res = {k: [] for k in runs}
    for r in range(a.rounds):
        for name, args in runs.items():
            res[name].append(peak_rss_mb(args))
            print(f"round {r}: {name}: {res[name][-1]:.0f} MB", flush=True)
    med = {k: statistics.median(v) for k, v in res.items()}
    base = med["imports only (ours)"]
    state = 16 * params / 2**20
    print(f"\nmedian (min-max) of {a.rounds} rounds; Qwen2 {params / 1e6:.1f} M parameters, vocabulary {VOCAB}, fp32")
    print(f"lower bound: imports {base:.0f} MB + weights, gradients, Adam moments {state:.0f} MB = {base + state:.0f} MB"
          f" (+ one micro-batch's activations; DPO + {4 * params / 2**20:.0f} MB for its frozen reference)")
    for k, v in res.items():
        print(f"  {k}: {med[k]:.0f} MB ({min(v):.0f}-{max(v):.0f})")
    if "rlvr" in only:
        lo, hi = med[f"RLVR ours, {RLVR_SAMPLES[0]} samples"], med[f"RLVR ours, {RLVR_SAMPLES[-1]} samples"]
        print(f"RLVR ours {RLVR_SAMPLES[-1]} / {RLVR_SAMPLES[0]} samples: {hi / lo:.3f} (goal <= 1.10); "
              f"ours / TRL at 64: {med['RLVR ours, 64 samples'] / med['RLVR TRL GRPOTrainer, 64 samples']:.2f} (goal <= 1)")
    for algo, peer in (("SFT", "SFTTrainer"), ("DPO", "DPOTrainer")):
        if algo.lower() in only:
            print(f"{algo} ours / TRL {peer}: {med[f'{algo} ours'] / med[f'{algo} TRL {peer}']:.2f} (goal <= 0.5)")
    if "distill" in only:
        for gc in ("", ", checkpointing"):
            ratio = med[f"distill ours{gc}"] / med[f"distill TRL DistillationTrainer{gc}"]
            print(f"distill{gc} ours / TRL DistillationTrainer: {ratio:.2f} (goal <= 1)")


if __name__ == "__main__":
    main()
