"""A teacher's own samples of the train prompts as an SFT file (off-policy distillation: SFT on teacher samples), and
what sampling them cost.

    python scripts/teacher_samples.py TEACHER_DIR out.jsonl [--samples 1] [--temperature 1.0] [key=value ...]

The prompts are the train split of the data the overrides compose (default: the embedded arithmetic task), rendered
as training renders them; each gets `--samples` completions from the teacher (HF engine, `--max-new-tokens` as
algo.max_new_tokens), written as `{"prompt", "completion"}` rows for `algo=sft data=jsonl_sft`. Completions the
budget cut (no <eos>) are dropped, as an SFT row needs its end, and so are empty ones (<eos> first: an SFT row needs a
completion). Prints the sampling FLOPs (2 N a token, the prompt's
and the completion's) so a learning table can charge them to the SFT run.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("teacher")
    ap.add_argument("out")
    ap.add_argument("--samples", type=int, default=1)
    ap.add_argument("--temperature", type=float, default=1.0)
    ap.add_argument("--max-new-tokens", type=int, default=8)
    ap.add_argument("--batch", type=int, default=500)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("overrides", nargs="*")
    a = ap.parse_args()

    import tempfile

    import hydra

    import genlight
    from genlight.models.lm import from_pretrained
    from genlight.models.rollout import HFRollout

    cfg = genlight.compose(["algo=rlvr", *a.overrides], output_dir=tempfile.mkdtemp(prefix="teacher_samples_"))
    tok = hydra.utils.instantiate(cfg.model.tokenizer)
    dm = hydra.utils.instantiate(cfg.data, tokenizer=tok)
    dm.setup("fit")
    examples = dm.examples["train"]
    teacher = from_pretrained(tok, a.teacher).eval()
    n_params = sum(p.numel() for p in teacher.parameters())
    engine = HFRollout(teacher, tok.eos_token_id, tok.pad_token_id)
    gen = torch.Generator().manual_seed(a.seed)
    rows, tokens, cut, empty = [], 0, 0, 0
    with torch.no_grad():
        for s in range(0, len(examples), a.batch):
            part = examples[s : s + a.batch]
            width = max(len(e["prompt_ids"]) for e in part)
            ids = torch.tensor([[tok.pad_token_id] * (width - len(e["prompt_ids"])) + e["prompt_ids"] for e in part])
            mask = torch.tensor([[0] * (width - len(e["prompt_ids"])) + [1] * len(e["prompt_ids"]) for e in part])
            roll = engine.generate(ids, mask, a.samples, a.max_new_tokens, a.temperature, 1.0, gen)
            texts = tok.batch_decode(roll.completion_ids, skip_special_tokens=True)
            tokens += int(mask.sum()) + int(roll.lengths.sum())  # each prompt prefilled once for its samples
            for i, text in enumerate(texts):
                if roll.truncated[i]:
                    cut += 1
                    continue
                if not text.strip():
                    empty += 1
                    continue
                rows.append({"prompt": part[i // a.samples]["prompt"], "completion": text})
    Path(a.out).write_text("".join(json.dumps(r) + "\n" for r in rows))
    print(json.dumps({"rows": len(rows), "cut": cut, "empty": empty, "tokens": tokens, "sampling_flops": 2.0 * n_params * tokens,
                      "teacher_params": n_params}))


if __name__ == "__main__":
    main()
