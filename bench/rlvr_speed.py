"""RLVR benchmark: our RLVRModule (Lightning) against TRL's GRPOTrainer on identical work.

    OMP_WAIT_POLICY=PASSIVE python bench/rlvr_speed.py [--steps 30] [--rounds 3]
    OMP_WAIT_POLICY=PASSIVE python bench/rlvr_speed.py --size 30m --steps 4   # compute-bound
    OMP_WAIT_POLICY=PASSIVE python bench/rlvr_speed.py --learning --init DIR --budget 300
    OMP_WAIT_POLICY=PASSIVE python bench/rlvr_speed.py --engines --size tiny|30m   (rollout=vllm vs rollout=hf)
    OMP_WAIT_POLICY=PASSIVE python bench/rlvr_speed.py --recompute --size tiny|30m (algo.recompute_gen_logps cost)

Speed (default): the default tiny Llama (same seed), arithmetic prompts, 16 prompts x 8 samples
per step, at most 6 new tokens, temperature 1, lr 1e-4 constant, loss cispo (eps 5), no KL, fp32,
2 CPU threads, on-policy (generation_lag 0, as TRL), zero-variance filtering and retirement off
on our side (TRL has neither). TRL: num_generations=8, per_device_train_batch_size=128 (it counts
completions), epsilon_high=5.0, beta=0, no activation/gradient checkpointing. Timed from just
before training to its end; rounds alternate ours and TRL. Generation alone: our KV-cache engine
(prefill once per prompt, cache shared by the 8 samples) against `model.generate(do_sample=True)`
on the 128 repeated prompts, which is what TRL calls.

`--size 30m` (compute-bound): a 33.6 M Llama (hidden 512, 8 layers), 8 prompts x 8 samples per step, prompts of
100-190 tokens (random text ending in a question), at most 64 new tokens (sampling stops at <eos> too, so
completion lengths vary), reward 1 when the completion contains the prompt's answer digit (about half of the
random init's completions do: groups have variance, so every step trains). The same reward function, model init and
settings on both sides; everything else as above.

Learning (--learning): from the same SFT checkpoint (--init, e.g. a warm-start export
`<run>/sft_init`), each trainer runs for --budget seconds of wall-clock, then both policies are
scored identically (both with our default recipe's batch of 64 prompts x 8, lr 5e-5, Adam beta2
0.99, 20 warm-up steps; ours adds lag 8, zero-variance filtering and retirement): pass@1 over 8 samples (temperature 1) per val prompt, greedy exact match too.
TRL is an optional bench dependency: pip install -e ".[bench]".

Engines (--engines, needs `make install-vllm`): our two rollout engines on identical work, generation
tokens/s (G samples of each prompt, temperature 1) and RL optimizer steps/s (on-policy, so the vLLM
engine gets the new weights pushed before every step, as it would with generation_lag 1), rounds
alternating. `--size tiny`: the default 1 M model, 16 prompts x 8, <= 6 new tokens. `--size 30m`: a
33.6 M Llama (hidden 512, 8 layers, head dim 64), 8 prompts x 8, 64 new tokens.
"""

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

from genlight.datamodules.arithmetic import ArithmeticTask  # noqa: E402
from genlight.datamodules.lm import LMDataModule, pad  # noqa: E402
from genlight.lightning_modules.rlvr import RLVRModule  # noqa: E402
from genlight.models import char_tokenizer, tiny_llama  # noqa: E402
from genlight.models.rollout import HFRollout  # noqa: E402
from genlight.rewards import ExactAnswer, FunctionReward  # noqa: E402

PROMPTS, G, NEW, LR, TEMP = 16, 8, 6, 1e-4, 1.0
# the learning comparison runs both with our default recipe's settings (conf/algo/rlvr.yaml)
LEARNING = {"prompts": 64, "lr": 5e-5, "beta2": 0.99, "warmup": 20}


class Rows:
    def __init__(self, rows):
        self._rows = rows

    def rows(self, split):
        return self._rows


def prompt_rows(n: int, split: str = "train"):
    """The default task's splits (conf/data/arithmetic.yaml), so val is held out from any SFT on train."""
    task = ArithmeticTask(n_train=8000, n_val=500, n_test=1000, seed=1234)
    rows = [r for _, r in task.rows(split)]
    return (rows * (n // len(rows) + 1))[:n] if split == "train" else rows


def load_model(tok, init: str | None):
    if init:
        from transformers import AutoModelForCausalLM

        return AutoModelForCausalLM.from_pretrained(init, local_files_only=True)
    return tiny_llama(tok, seed=0)


# --------------------------------------------------------------------------- ours
def ours(rows, steps: int | None, init: str | None = None, budget: float | None = None, lag: int = 0,
         rollout=None, net=None, prompts: int = PROMPTS, new: int = NEW, reward=None, max_length: int = 32,
         recompute: bool = False):
    tok = char_tokenizer()
    learning = budget is not None
    dm = LMDataModule(Rows([(f"row {i}", r) for i, r in enumerate(rows)]), tok, kind="prompt",
                      batch_size=LEARNING["prompts"] if learning else prompts, max_length=max_length)
    dm.setup()
    model = net() if net else load_model(tok, init)
    module = RLVRModule(
        net=lambda tokenizer: model, tokenizer=tok, reward=FunctionReward(reward) if reward else ExactAnswer(),
        num_generations=G, max_new_tokens=new,
        rollout=rollout,
        temperature=TEMP, loss_type="cispo", epsilon=5.0, beta=0.0, lr=LEARNING["lr"] if learning else LR,
        betas=(0.9, LEARNING["beta2"]) if learning else (0.9, 0.999), weight_decay=0.0,
        warmup_steps=LEARNING["warmup"] if learning else 0,
        min_lr_ratio=1.0, generation_lag=lag, zero_variance_filter=learning,
        retire_threshold=0.9 if learning else None, log_completions_every_n_steps=0, recompute_gen_logps=recompute,
    )
    trainer = L.Trainer(accelerator="cpu", max_steps=steps or -1, max_time={"seconds": budget} if budget else None,
                        logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, limit_val_batches=0, num_sanity_val_steps=0,
                        gradient_clip_val=1.0)
    t0 = time.perf_counter()
    trainer.fit(module, datamodule=dm)
    return trainer.global_step / (time.perf_counter() - t0), module.model


# --------------------------------------------------------------------------- TRL
def trl(rows, steps: int | None, init: str | None = None, budget: float | None = None, net=None,
        prompts: int = PROMPTS, new: int = NEW, reward=None):
    import datasets
    from transformers import TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    tok = char_tokenizer()
    model = net() if net else load_model(tok, init)
    ds = datasets.Dataset.from_list([{"prompt": r["prompt"], "answer": r["answer"]} for r in rows])

    def exact(prompts, completions, answer, **kw):
        if reward:
            return [float(reward(c, a)) for c, a in zip(completions, answer)]
        return [float(c.strip() == a) for c, a in zip(completions, answer)]

    class Budget(TrainerCallback):
        def on_step_end(self, args, state, control, **kw):
            if budget and time.perf_counter() - t0 > budget:
                control.should_training_stop = True

    args = GRPOConfig(
        output_dir=tempfile.mkdtemp(), per_device_train_batch_size=(LEARNING["prompts"] if budget else prompts) * G,
        num_generations=G, max_completion_length=new, temperature=TEMP,
        learning_rate=LEARNING["lr"] if budget else LR, adam_beta2=LEARNING["beta2"] if budget else 0.999,
        lr_scheduler_type="constant_with_warmup" if budget else "constant",
        warmup_steps=LEARNING["warmup"] if budget else 0, weight_decay=0.0, loss_type="cispo", epsilon_high=5.0, beta=0.0, scale_rewards="batch",
        max_steps=steps or 10**6, bf16=False, fp16=False, use_cpu=True,
        gradient_checkpointing=False, report_to="none", logging_steps=10**6, save_strategy="no",
        disable_tqdm=True, dataloader_num_workers=0, max_grad_norm=1.0, seed=0,
    )
    trainer = GRPOTrainer(model=model, reward_funcs=exact, args=args, train_dataset=ds, processing_class=tok,
                          callbacks=[Budget()])
    t0 = time.perf_counter()
    trainer.train()
    return trainer.state.global_step / (time.perf_counter() - t0), trainer.model


# --------------------------------------------------------------------------- generation only
def generation(rows, reps: int = 5) -> tuple[float, float]:
    """Generated tokens/s: our engine vs. HF generate() on the G-times repeated prompts (TRL's way)."""
    tok = char_tokenizer()
    model = tiny_llama(tok, seed=0).eval()
    ids = [tok(r["prompt"])["input_ids"] for r in rows[:PROMPTS]]
    p, m = pad(ids, tok.pad_token_id, left=True), pad([[1] * len(i) for i in ids], 0, left=True)
    engine = HFRollout(model, tok.eos_token_id, tok.pad_token_id)
    ours_t, hf_t, n_ours, n_hf = [], [], 0, 0
    for r in range(reps):
        t0 = time.perf_counter()
        roll = engine.generate(p, m, G, NEW, TEMP, 1.0, torch.Generator().manual_seed(r))
        ours_t.append(time.perf_counter() - t0)
        n_ours = int(roll.lengths.sum())
        t0 = time.perf_counter()
        with torch.no_grad():
            out = model.generate(input_ids=p.repeat_interleave(G, 0), attention_mask=m.repeat_interleave(G, 0),
                                 do_sample=True, temperature=TEMP, top_p=1.0, top_k=0, max_new_tokens=NEW,
                                 pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)
        hf_t.append(time.perf_counter() - t0)
        gen = out[:, p.size(1):]
        n_hf = int((gen != tok.pad_token_id).sum())
    return n_ours / statistics.median(ours_t), n_hf / statistics.median(hf_t)


# --------------------------------------------------------------------------- rollout=vllm vs rollout=hf
def engines(size: str, rounds: int, steps: int) -> None:
    from genlight.models.rollout_vllm import VLLMRollout

    tok = char_tokenizer()
    if size == "30m":
        net = lambda: tiny_llama(tok, hidden_size=512, num_layers=8, num_heads=8, intermediate_size=2048, seed=0)  # noqa: E731
        prompts, new = 8, 64
    else:
        net = lambda: tiny_llama(tok, seed=0)  # noqa: E731
        prompts, new = PROMPTS, NEW
    make = {"hf": HFRollout, "vllm": lambda m, e, p: VLLMRollout(m, e, p, max_model_len=128)}
    rows = prompt_rows(prompts * steps)
    ids = [tok(r["prompt"])["input_ids"] for r in rows[:prompts]]
    p, m = pad(ids, tok.pad_token_id, left=True), pad([[1] * len(i) for i in ids], 0, left=True)
    model = net().eval()
    print(f"{size}: {sum(x.numel() for x in model.parameters()) / 1e6:.1f} M params, {prompts} prompts x {G} "
          f"samples, <= {new} new tokens", flush=True)
    built = {k: make[k](model, tok.eos_token_id, tok.pad_token_id) for k in make}
    built["vllm"].generate(p, m, G, new, TEMP, 1.0, torch.Generator().manual_seed(0))  # engine start + warm-up
    res = {f"{k}/{w}": [] for k in make for w in ("gen", "rl")}
    for r in range(rounds):
        for k in make:  # alternating engines in every round
            t0 = time.perf_counter()
            roll = built[k].generate(p, m, G, new, TEMP, 1.0, torch.Generator().manual_seed(r + 1))
            res[f"{k}/gen"].append(int(roll.lengths.sum()) / (time.perf_counter() - t0))
            res[f"{k}/rl"].append(ours(rows, steps, rollout=make[k], net=net, prompts=prompts, new=new)[0])
        print(f"round {r}: " + "  ".join(f"{k} {v[-1]:.2f}" for k, v in res.items()), flush=True)
    spread = lambda v: f"{statistics.median(v):.2f} ({min(v):.2f}-{max(v):.2f})"  # noqa: E731
    print(f"\nmedian (min-max) of {rounds} rounds, {torch.get_num_threads()} threads")
    for w, unit in (("gen", "generated tokens/s"), ("rl", "RL optimizer steps/s")):
        ratio = statistics.median(res[f"vllm/{w}"]) / statistics.median(res[f"hf/{w}"])
        print(f"  {unit}: vllm {spread(res[f'vllm/{w}'])}  hf {spread(res[f'hf/{w}'])}  vllm/hf {ratio:.2f}x")


# --------------------------------------------------------------------------- compute-bound: ours vs TRL at 33.6 M
def contains_answer(completion: str, answer: str) -> float:
    return float(answer in completion)


def long_prompt_rows(n: int, seed: int = 0) -> list[dict]:
    import random

    rng, abc = random.Random(seed), "abcdefghijklmnopqrstuvwxyz0123456789 "
    return [{"prompt": "".join(rng.choices(abc, k=rng.randint(98, 188))) + " ?", "answer": rng.choice("0123456789")}
            for _ in range(n)]


def compute_bound(rounds: int, steps: int) -> None:
    tok = char_tokenizer()
    net = lambda: tiny_llama(tok, hidden_size=512, num_layers=8, num_heads=8, intermediate_size=2048,  # noqa: E731
                             max_position_embeddings=512, seed=0)
    prompts, new = 8, 64
    rows = long_prompt_rows(prompts * steps)
    print(f"33.6 M Llama: {prompts} prompts x {G} samples per step, prompts 100-190 tokens, <= {new} new tokens, "
          f"{steps} steps per run", flush=True)
    res = {"ours": [], "trl": []}
    for r in range(rounds):  # alternating
        res["ours"].append(ours(rows, steps, net=net, prompts=prompts, new=new, reward=contains_answer,
                                max_length=512)[0])
        res["trl"].append(trl(rows, steps, net=net, prompts=prompts, new=new, reward=contains_answer)[0])
        print(f"round {r}: ours {res['ours'][-1]:.3f} steps/s, TRL {res['trl'][-1]:.3f} steps/s", flush=True)
    spread = lambda v: f"{statistics.median(v):.3f} ({min(v):.3f}-{max(v):.3f})"  # noqa: E731
    ratios = [a / b for a, b in zip(res["ours"], res["trl"])]
    print(f"\nmedian (min-max) of {rounds} rounds, {torch.get_num_threads()} threads")
    print(f"  RL optimizer steps/s: ours {spread(res['ours'])}  TRL GRPOTrainer {spread(res['trl'])}  "
          f"ratio {statistics.median(res['ours']) / statistics.median(res['trl']):.2f}x "
          f"(per-round {min(ratios):.2f}-{max(ratios):.2f})")


# --------------------------------------------------------------------------- the cost of recompute_gen_logps
def recompute_cost(size: str, rounds: int, steps: int) -> None:
    """Our trainer at generation lag 8, algo.recompute_gen_logps off vs on (the generator's log-probs recomputed with
    the trainer's kernels: one more forward pass a step), rounds alternating; the same work otherwise."""
    tok = char_tokenizer()
    if size == "30m":
        net = lambda: tiny_llama(tok, hidden_size=512, num_layers=8, num_heads=8, intermediate_size=2048,  # noqa: E731
                                 max_position_embeddings=512, seed=0)
        kw = {"prompts": 8, "new": 64, "reward": contains_answer, "max_length": 512}
        rows = long_prompt_rows(8 * steps)
    else:
        net, kw, rows = (lambda: tiny_llama(tok, seed=0)), {}, prompt_rows(PROMPTS * steps)
    print(f"{size}: {kw.get('prompts', PROMPTS)} prompts x {G} samples, lag 8, {steps} steps per run", flush=True)
    res = {False: [], True: []}
    for r in range(rounds):
        for flag in res:  # alternating
            res[flag].append(ours(rows, steps, lag=8, net=net, recompute=flag, **kw)[0])
        print(f"round {r}: off {res[False][-1]:.3f} steps/s, on {res[True][-1]:.3f} steps/s", flush=True)
    spread = lambda v: f"{statistics.median(v):.3f} ({min(v):.3f}-{max(v):.3f})"  # noqa: E731
    cost = [a / b - 1 for a, b in zip(res[False], res[True])]
    print(f"\nmedian (min-max) of {rounds} rounds, {torch.get_num_threads()} threads")
    print(f"  RL optimizer steps/s: recompute off {spread(res[False])}  on {spread(res[True])}  "
          f"time per step +{100 * statistics.median(cost):.0f}% (per-round {100 * min(cost):+.0f}% to "
          f"{100 * max(cost):+.0f}%)")


# --------------------------------------------------------------------------- evaluation
@torch.no_grad()
def evaluate(model, n_samples: int = 8) -> tuple[float, float]:
    """(pass@1 over n samples at temperature 1, greedy exact match) on the 500 val prompts."""
    tok = char_tokenizer()
    rows = prompt_rows(0, "val")
    engine = HFRollout(model.eval(), tok.eos_token_id, tok.pad_token_id)
    verify, passed, greedy = ExactAnswer(), 0.0, 0.0
    for i in range(0, len(rows), 250):
        chunk = rows[i : i + 250]
        ids = [tok(r["prompt"])["input_ids"] for r in chunk]
        p, m = pad(ids, tok.pad_token_id, left=True), pad([[1] * len(x) for x in ids], 0, left=True)
        roll = engine.generate(p, m, n_samples, 8, 1.0, 1.0, torch.Generator().manual_seed(i))
        texts = tok.batch_decode(roll.completion_ids, skip_special_tokens=True)
        passed += sum(verify(t, chunk[j // n_samples]["answer"]) for j, t in enumerate(texts)) / n_samples
        roll = engine.generate(p, m, 1, 8, 1.0, 1e-9, torch.Generator().manual_seed(i))  # top_p -> greedy
        texts = tok.batch_decode(roll.completion_ids, skip_special_tokens=True)
        greedy += sum(verify(t, r["answer"]) for t, r in zip(texts, chunk))
    return passed / len(rows), greedy / len(rows)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--learning", action="store_true")
    ap.add_argument("--init", default=None, help="SFT checkpoint directory to start from (learning)")
    ap.add_argument("--budget", type=float, default=300.0, help="seconds of training each (learning)")
    ap.add_argument("--engines", action="store_true", help="rollout=vllm vs rollout=hf")
    ap.add_argument("--size", choices=["tiny", "30m"], default="tiny")
    ap.add_argument("--recompute", action="store_true", help="the cost of algo.recompute_gen_logps (lag 8)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    cpu = cpu_name()
    print(f"CPU: {cpu}, {torch.get_num_threads()} threads", flush=True)
    if args.engines:
        engines(args.size, args.rounds, args.steps)
        return
    if args.recompute:
        recompute_cost(args.size, args.rounds, args.steps)
        return

    if args.learning:
        if not args.init:
            sys.exit("--learning needs --init DIR (an SFT checkpoint, e.g. <run>/sft_init)")
        rows = prompt_rows(8000)
        start = evaluate(load_model(char_tokenizer(), args.init))
        print(f"SFT start: pass@1 {start[0]:.3f}  greedy {start[1]:.3f}", flush=True)
        sps, model = ours(rows, None, args.init, args.budget, lag=8)
        a = evaluate(model)
        print(f"ours ({args.budget:.0f} s, {sps:.2f} steps/s, lag 8): pass@1 {a[0]:.3f}  greedy {a[1]:.3f}", flush=True)
        sps, model = trl(rows, None, args.init, args.budget)
        b = evaluate(model)
        print(f"TRL  ({args.budget:.0f} s, {sps:.2f} steps/s): pass@1 {b[0]:.3f}  greedy {b[1]:.3f}", flush=True)
        print(f"\npass@1 gain over the SFT start: ours {100 * (a[0] - start[0]):+.1f} points, "
              f"TRL {100 * (b[0] - start[0]):+.1f} points")
        return

    if args.size == "30m":
        compute_bound(args.rounds, args.steps)
        return
    rows = prompt_rows(PROMPTS * args.steps)
    res = {k: [] for k in ("ours", "trl", "gen_ours", "gen_hf")}
    for r in range(args.rounds):  # alternate so background load hits both alike
        res["ours"].append(ours(rows, args.steps)[0])
        res["trl"].append(trl(rows, args.steps)[0])
        go, gh = generation(rows)
        res["gen_ours"].append(go)
        res["gen_hf"].append(gh)
        print(f"round {r}: ours {res['ours'][-1]:.2f} steps/s, TRL {res['trl'][-1]:.2f} steps/s, "
              f"generation ours {go:.0f} tok/s, HF generate {gh:.0f} tok/s", flush=True)
    med = {k: statistics.median(v) for k, v in res.items()}
    spread = {k: f"({min(v):.2f}-{max(v):.2f})" for k, v in res.items()}
    print(f"\nmedian (min-max) of {args.rounds} rounds; {args.steps} steps of {PROMPTS} prompts x {G} samples, "
          f"<= {NEW} new tokens; {args.threads} threads")
    print(f"  optimizer steps/s: ours {med['ours']:.2f} {spread['ours']}  TRL {med['trl']:.2f} {spread['trl']}  "
          f"ratio {med['ours'] / med['trl']:.2f}x")
    print(f"  generation tokens/s: ours {med['gen_ours']:.0f} {spread['gen_ours']}  HF generate (TRL's) "
          f"{med['gen_hf']:.0f} {spread['gen_hf']}  ratio {med['gen_ours'] / med['gen_hf']:.2f}x")


if __name__ == "__main__":
    main()
