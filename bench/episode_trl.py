"""Multi-turn RL with a tool: our RLVRModule over episodes against TRL 1.16's GRPOTrainer with `environment_factory`, on
the same calculator environment, model and prompts.

    OMP_WAIT_POLICY=PASSIVE python bench/episode_trl.py --init DIR [--steps 10] [--rounds 3] [--prompts 8]

`--init`: a policy that already calls the calculator, e.g. the warm start of `python train.py
experiment=calculator_tool` (`<run>/sft_init`, or its `warm_start.cache_dir` entry); both sides start from it.

The work (conf/experiment/calculator_tool.yaml's): 3-digit multiplication prompts (the task's train split), 8 episodes
per prompt, `Calculator` from genlight.envs.calculator as the environment on both sides (TRL's contract: reset and one
documented tool), at most 3 assistant turns (TRL: `max_tool_calling_iterations=2`) and 160 episode tokens (TRL:
`max_completion_length=160`), temperature 1, reward 1 when the last assistant turn is exactly the product. The recipe
is made equal where the two can be: CISPO with eps 5 (TRL: `loss_type="cispo"`, `epsilon_high=5`) over all the step's
policy tokens (ours: `loss_agg="token"`, TRL's cispo normaliser; our preset's is per prompt), no KL, batch-scaled
advantages (TRL divides by the raw rewards' std, ours by the group-centred rewards' std: one factor for the whole
step, which Adam mostly absorbs), Adam (0.9, 0.99) at a constant lr 1e-4 with no warm-up, gradient clipping 1.0,
on-policy (our `generation_lag=0`), no zero-variance filtering or prompt retirement on our side (TRL has neither),
fp32, no gradient checkpointing. What differs and stays: our turn is capped at 96 new tokens (the preset's
`algo.max_new_tokens`), TRL caps only the episode; our HF engine keeps each episode's KV cache across turns
(rollout=hf), TRL's `generate` re-reads the whole context each turn. The chat template is the character tokenizer's;
TRL parses its turns with a response template written here for it (the tool call, then the text up to </s>).

Timed alike from outside the training code: wall time between optimizer-step ends (a Lightning callback, a
transformers TrainerCallback), the median over the steps after the first. Then both trained policies are scored by the
same function: held-out pass@1 over the task's val prompts (`--eval` of them x 4 episodes at temperature 1, our
episode code and exact match), alongside the start's. Round r is training seed r on both sides (our module's and
data's seeds, TRL's `seed`: sampling and prompt order) and evaluation seed r; rounds alternate ours and TRL; reported
as median (min-max)."""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import lightning as L
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from machine import cpu_name  # noqa: E402  (bench/machine.py)

from genlight.datamodules.lm import LMDataModule  # noqa: E402
from genlight.envs.calculator import Calculator, CalculatorTask  # noqa: E402
from genlight.envs.episodes import reset_groups, run_episodes  # noqa: E402
from genlight.envs.tools import EnvSpec  # noqa: E402
from genlight.lightning_modules.rlvr import RLVRModule  # noqa: E402
from genlight.models.lm import from_pretrained  # noqa: E402
from genlight.models.rollout import HFRollout  # noqa: E402
from genlight.models.tokenizer import load_tokenizer  # noqa: E402
from genlight.rewards import ExactAnswer  # noqa: E402

G, MAX_TURNS, MAX_TOKENS, TURN_TOKENS, LR, EPS = 8, 3, 160, 96, 1e-4, 5.0
# TRL parses an assistant turn of the character tokenizer's template with this (transformers' response_template
# format, as trl.chat_template_utils writes them for Qwen): tool calls, then the text up to </s>
RESPONSE_TEMPLATE = {
    "defaults": {"role": "assistant"},
    "start_anchor": "<|assistant|>",
    "fields": {
        "tool_calls": {"open": "<tool_call>", "close_pattern": r"</tool_call>\s*", "repeats": True, "content": "json",
                       "transform": {"type": "function", "function": "{content}"}},
        "content": {"close_pattern": r"</s>\s*", "content": "text"},
    },
}


def task() -> CalculatorTask:
    return CalculatorTask(digits=3, ops=("*",), n_train=4000, n_val=200, n_test=500, seed=1234)  # conf/data/calculator


class StepTimes(L.Callback):
    def __init__(self):
        self.ends = []

    def on_train_batch_end(self, *args, **kwargs):
        self.ends.append(time.perf_counter())


def ours(init: str, steps: int, prompts: int, seed: int) -> tuple[list[float], torch.nn.Module]:
    tok = load_tokenizer(init)
    dm = LMDataModule(task(), tok, kind="prompt", batch_size=prompts, max_length=256, seed=seed)
    module = RLVRModule(
        net=init, tokenizer=tok, reward=ExactAnswer(), env=EnvSpec(Calculator, max_turns=MAX_TURNS,
                                                                   max_tokens=MAX_TOKENS),
        num_generations=G, max_new_tokens=TURN_TOKENS, temperature=1.0, loss_type="cispo", epsilon=EPS, beta=0.0,
        loss_agg="token", advantage="scalerl", seed=seed, lr=LR, betas=(0.9, 0.99), weight_decay=0.0, warmup_steps=0,
        min_lr_ratio=1.0, generation_lag=0, zero_variance_filter=False, retire_threshold=None,
        log_completions_every_n_steps=0,
    )
    times = StepTimes()
    trainer = L.Trainer(accelerator="cpu", max_steps=steps, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
                        num_sanity_val_steps=0, gradient_clip_val=1.0, callbacks=[times])
    trainer.fit(module, datamodule=dm)
    return times.ends, module.model


def trl(init: str, steps: int, prompts: int, seed: int) -> tuple[list[float], torch.nn.Module]:
    import datasets
    from transformers import TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    tok = load_tokenizer(init)
    tok.response_template = RESPONSE_TEMPLATE
    model = from_pretrained(tok, init)
    rows = [r for _, r in task().rows("train")]
    ds = datasets.Dataset.from_list([{"prompt": r["messages"], "answer": r["answer"]} for r in rows])
    verifier = ExactAnswer()

    def exact(prompts, completions, answer, **kw):  # the last assistant turn, as our verifier reads it
        return [float(verifier.match(verifier.extract(c[-1]["content"]), a) if c and c[-1]["role"] == "assistant"
                      else 0.0) for c, a in zip(completions, answer)]

    ends = []

    class Times(TrainerCallback):
        def on_step_end(self, args, state, control, **kw):
            ends.append(time.perf_counter())

    args = GRPOConfig(
        output_dir=tempfile.mkdtemp(), per_device_train_batch_size=prompts * G, num_generations=G,
        max_completion_length=MAX_TOKENS, max_tool_calling_iterations=MAX_TURNS - 1, temperature=1.0,
        learning_rate=LR, adam_beta1=0.9, adam_beta2=0.99, lr_scheduler_type="constant", warmup_steps=0,
        weight_decay=0.0, loss_type="cispo", epsilon_high=EPS, beta=0.0, scale_rewards="batch", max_steps=steps,
        bf16=False, fp16=False, use_cpu=True, gradient_checkpointing=False, report_to="none", logging_steps=10**6,
        save_strategy="no", disable_tqdm=True, dataloader_num_workers=0, max_grad_norm=1.0, seed=seed,
    )
    trainer = GRPOTrainer(model=model, reward_funcs=exact, args=args, train_dataset=ds, processing_class=tok,
                          environment_factory=Calculator, callbacks=[Times()])
    trainer.train()
    return ends, trainer.model


def held_out_pass(model, init: str, n: int, samples: int = 4, seed: int = 0) -> float:
    """pass@1 over the val split's first n prompts x `samples` episodes (temperature 1), by our episode code and exact
    match: the same scorer for both trained policies."""
    tok = load_tokenizer(init)
    spec = EnvSpec(Calculator, max_turns=MAX_TURNS, max_tokens=MAX_TOKENS)
    rows = [r for _, r in task().rows("val")][:n]
    model = model.eval()
    engine = HFRollout(model, tok.eos_token_id, tok.pad_token_id)
    verifier, hits, total = ExactAnswer(), 0, 0
    for i in range(0, n, 25):
        part = rows[i:i + 25]
        prompts, envs = reset_groups(spec, tok, [r["messages"] for r in part], [r["answer"] for r in part],
                                     list(range(i, i + len(part))), [{}] * len(part), samples)
        with torch.no_grad():
            ep = run_episodes(engine, tok, prompts, envs, samples, MAX_TURNS, TURN_TOKENS, MAX_TOKENS, 1.0, 1.0,
                              torch.Generator().manual_seed(seed + i))
        for e in envs:
            e.close()
        for j, text in enumerate(ep.answers):
            hits += bool(verifier.match(verifier.extract(text), part[j // samples]["answer"]))
            total += 1
    return hits / total


def spread(xs: list[float], fmt: str = "{:.3f}") -> str:
    return f"{fmt.format(statistics.median(xs))} ({fmt.format(min(xs))}-{fmt.format(max(xs))})"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--init", required=True, help="a calculator warm start (HF directory with its tokenizer)")
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--prompts", type=int, default=8)
    ap.add_argument("--eval", type=int, default=100, help="held-out prompts scored after each run (x 4 episodes)")
    a = ap.parse_args()
    print(f"CPU: {cpu_name()}, torch threads {torch.get_num_threads()}; {a.prompts} prompts x {G} episodes a step, "
          f"{a.steps} steps, {a.rounds} rounds alternating; start: {a.init}")
    start = held_out_pass(from_pretrained(load_tokenizer(a.init), a.init), a.init, a.eval)
    print(f"held-out pass@1 of the start: {start:.3f}")
    res = {"ours": [], "trl": []}
    for r in range(a.rounds):
        for name, fn in (("ours", ours), ("trl", trl)) if r % 2 == 0 else (("trl", trl), ("ours", ours)):
            L.seed_everything(r, verbose=False)  # and each side's own seeds: a round is a training seed
            ends, model = fn(a.init, a.steps, a.prompts, r)
            step = statistics.median(b - e for e, b in zip(ends[:-1], ends[1:]))  # after the first step
            score = held_out_pass(model, a.init, a.eval, seed=r)
            res[name].append((step, score))
            print(f"  round {r} {name}: {step:.2f} s/step (median of {len(ends) - 1}), held-out pass@1 {score:.3f}")
    o, t = res["ours"], res["trl"]
    print(f"s/step: ours {spread([s for s, _ in o], '{:.2f}')}  TRL GRPOTrainer {spread([s for s, _ in t], '{:.2f}')}"
          f"  TRL / ours {statistics.median(s for s, _ in t) / statistics.median(s for s, _ in o):.2f}x")
    print(f"held-out pass@1 after {a.steps} steps (start {start:.3f}): ours {spread([p for _, p in o])}  "
          f"TRL {spread([p for _, p in t])}")


if __name__ == "__main__":
    main()
