"""Test helpers shared across test modules (lightning-hydra-template keeps them in tests/helpers/)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def train_with(cfg, *callbacks):
    """train.py's `train(cfg)` with extra callbacks (recorders, fault injectors) added to the run."""
    from genlight.pipeline import train

    return train(cfg, extra_callbacks=list(callbacks))


def attach_trainer(module):
    """A module with a bare CPU Trainer attached, for calling its methods outside fit (self.trainer, self.device)."""
    import lightning as L

    module.trainer = L.Trainer(accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
                               enable_model_summary=False)
    return module


def leet(path: Path, summary: bool) -> list | dict:
    """What reached an offline W&B run, read back with `wandb leet inspect --json` (no mocked logger)."""
    cmd = [str(Path(sys.executable).parent / "wandb"), "leet", "inspect", "--json"] + (["--summary"] if summary else []) + [str(path)]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
    return json.loads(out) if summary else [json.loads(line) for line in out.splitlines() if line.strip()]


def wandb_history(path: Path) -> list[dict]:
    """The logged rows of an offline W&B run."""
    return [r["history"]["item"] for r in leet(path, summary=False) if r["type"] == "history"]


def run_cli(*args: str, tmp: Path) -> subprocess.CompletedProcess:
    """`python train.py ARGS` as users type it (a subprocess: pays the ~6 s import)."""
    env = {**os.environ, "WANDB_MODE": "offline", "PROJECT_ROOT": str(ROOT)}
    cmd = [sys.executable, str(ROOT / "train.py"), *args, f"paths.log_dir={tmp}"]
    return subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=tmp, timeout=300)


def parity_reward(completion: str, answer: str) -> float:
    """Even answers: always right (their prompts retire at once); odd: right if the completion
    starts with a character whose code point is a multiple of 4 (a quarter of a random policy's)."""
    return 1.0 if int(answer) % 2 == 0 else float(bool(completion) and ord(completion[0]) % 4 == 0)


# A small RLVR run on the arithmetic task with the parity verifier: seconds on 2 cores.
RLVR_RUN = [
    "algo=rlvr", "reward=custom", "reward.fn._target_=tests.helpers.parity_reward", "warm_start.max_steps=0",
    "test=false", "data.source.n_train=16", "data.batch_size=4", "data.eval_batch_size=16",
    "algo.num_generations=4", "algo.max_new_tokens=4", "algo.val_num_samples=2", "algo.lr=1e-3",
    "algo.generation_lag=3", "algo.truncated_reward=null", "trainer.val_check_interval=4",
]

# Diffusion runs: no logger, no progress bar (with quick=False: the LM quick settings name LM data keys).
DQUICK = [
    "algo=ddpm",
    "trainer.accelerator=cpu",
    "trainer.enable_model_summary=false",
    "trainer.enable_progress_bar=false",
    "trainer.log_every_n_steps=1",
    "extras.print_config=false",
    "logger=none",
]

def teacher_dir() -> Path:
    """A teacher for on-policy distillation (`teacher.pretrained`): a causal LM sharing the default character
    tokenizer, twice the default student's width, random weights, saved as an HF directory. Built once per machine
    (its name holds a hash of the tokenizer's vocabulary) and reused by every test and subprocess."""
    import hashlib
    import tempfile

    from genlight.models import char_tokenizer, tiny_llama

    tok = char_tokenizer()
    key = hashlib.sha256(json.dumps(sorted(tok.get_vocab().items())).encode()).hexdigest()[:12]
    path = Path(tempfile.gettempdir()) / f"genlight-test-teacher-{key}"
    if not (path / "config.json").exists():
        part = Path(tempfile.mkdtemp(dir=tempfile.gettempdir()))
        tiny_llama(tok, hidden_size=256, num_layers=2, num_heads=4, intermediate_size=512, seed=7).save_pretrained(part)
        tok.save_pretrained(part)
        try:
            part.rename(path)  # atomic: another process may have built it meanwhile
        except OSError:
            import shutil

            shutil.rmtree(part, ignore_errors=True)
    return path


TEACHER = teacher_dir()

# Every algorithm, as conf/algo/ lists them: tests that cover each algorithm parametrize over these (a new algorithm
# is picked up by adding its YAML; nothing lists them by hand).
ALGORITHMS = tuple(sorted(p.stem for p in (ROOT / "conf" / "algo").glob("*.yaml")))

# What a short run of an algorithm needs beyond `algo=NAME` and the tests' quick settings, where it needs anything:
# RLVR a verifier a random policy can pass and a few samples (distillation the same verifier); DDPM its own quick settings (not the LM data keys);
# TR-DPO a refresh within a few steps. Every other algorithm runs its own defaults with the warm start off.
SHORT = {
    "rlvr": [o for o in RLVR_RUN if o != "test=false"],
    "ddpm": DQUICK + ["data=toy2d", "data.n_train=1024", "data.n_val=100", "data.n_test=100", "data.batch_size=256",
                      "algo.val_num_samples=50", "algo.test_num_samples=50"],
    "tr_dpo": ["algo=tr_dpo", "warm_start.max_steps=0", "callbacks.reference_refresh.tau=2"],
    # distillation: the parity verifier too (held-out pass@k a random policy moves)
    "distill": ["algo=distill", "warm_start.max_steps=0", f"teacher.pretrained={TEACHER}", "reward=custom",
                "reward.fn._target_=tests.helpers.parity_reward", "algo.truncated_reward=null"],
}


# what an algorithm cannot run without, beyond its YAML (a teacher): as overrides, and as constructor arguments
REQUIRED = {"distill": [f"teacher.pretrained={TEACHER}"]}
REQUIRED_ARGS = {"distill": {"teacher": str(TEACHER)}}


def is_lm(algo: str) -> bool:
    """Whether the algorithm trains a language model (its data are LM rows: the tests' quick settings apply)."""
    text = (ROOT / "conf" / "algo" / f"{algo}.yaml").read_text()
    return "genlight.lightning_modules.ddpm" not in text


def short_run(algo: str) -> tuple[list[str], bool]:
    """(overrides, quick) of a short run of `algo`: its SHORT entry, else `algo=NAME` with the warm start off when
    its config asks for one."""
    if algo in SHORT:
        return list(SHORT[algo]), is_lm(algo)
    text = (ROOT / "conf" / "algo" / f"{algo}.yaml").read_text()
    return [f"algo={algo}"] + (["warm_start.max_steps=0"] if "/warm_start:" in text else []), is_lm(algo)


def episode_logps(model, pad_id: int, prompts: list[list[int]], ep):
    """The trainer's log-probs (no gradient) of episodes `ep` sampled from `prompts` (ids; their G samples each in
    order): the prompts left-padded, each encoded once for its samples, as the RLVR step encodes them."""
    import torch

    from genlight.models.logps import completion_logps

    width = max(len(p) for p in prompts)
    ids = torch.tensor([[pad_id] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    with torch.no_grad():
        logp, _ = completion_logps(model, ids, mask, ep.completion_ids, ep.completion_mask,
                                   group=ep.completion_ids.size(0) // len(prompts), with_entropy=False)
    return logp


class AnswerEngine:
    """A rollout engine that answers held-out prompts from a table: of each prompt's G samples, the even ones are its
    reference answer and the odd ones a wrong one ("?"), so pass@1 is exactly 0.5 and pass@2 1.0 whatever scores
    them (for checking evaluation plumbing with known values). `answers`: prompt ids (tuple) -> answer text."""

    def __init__(self, tokenizer, answers: dict[tuple, str]):
        self.tok, self.answers = tokenizer, answers

    def load_weights(self, state_dict) -> None:
        pass

    def generate(self, ctx, mask, g, max_new_tokens, temperature=1.0, top_p=1.0, generator=None):
        import torch

        from genlight.models.rollout import Rollout

        rows = []
        for row, m in zip(ctx, mask):
            answer = str(self.answers[tuple(row[m.bool()].tolist())])
            for j in range(g):
                ids = self.tok(answer if j % 2 == 0 else "?", add_special_tokens=False).input_ids
                rows.append(ids + [self.tok.eos_token_id])
        t = max(len(r) for r in rows)
        ids = torch.tensor([r + [self.tok.pad_token_id] * (t - len(r)) for r in rows])
        done = torch.tensor([[True] * len(r) + [False] * (t - len(r)) for r in rows])
        return Rollout(ids, done, torch.zeros(ids.shape), torch.zeros(len(rows), dtype=torch.bool))


def answer_engine_callback():
    """A callback that makes a run's held-out evaluation answer from the data's references (`AnswerEngine`)."""
    import lightning as L

    class Answers(L.Callback):
        def on_validation_epoch_start(self, trainer, module):
            dm = trainer.datamodule
            table = {tuple(e["prompt_ids"]): e["reference"] for e in dm.examples["val"]}
            module.eval_engine = AnswerEngine(module.tokenizer, table)

    return Answers()



def echo(x: str) -> str:
    """Echo.

    Args:
        x: text
    """
    return x
