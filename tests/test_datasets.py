"""Datasets by name: GSM8K's and MATH's exact schemas read through `datasets.load_dataset` (a local directory laid
out as the hub repository takes the same call as a hub name), column maps, answer patterns, chat prompts, the
errors, and the experiment=gsm8k preset."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from genlight.datamodules.files import DataError, FileSource, RowMap
from genlight.datamodules.lm import LMDataModule

GSM8K_README = """---
configs:
- config_name: main
  data_files:
  - split: train
    path: main/train-*
  - split: test
    path: main/test-*
- config_name: socratic
  data_files:
  - split: train
    path: socratic/train-*
  - split: test
    path: socratic/test-*
---
"""


def gsm8k_answer(i: int) -> str:  # GSM8K's format: the worked solution, calculator annotations, "#### <answer>"
    return f"Tom has {i} apples and buys {i} more.\nHe has {i}+{i}=<<{i}+{i}={2 * i}>>{2 * i} apples.\n#### {2 * i}"


@pytest.fixture(scope="module")
def gsm8k_dir(tmp_path_factory) -> Path:
    """openai/gsm8k's repository layout and schema: README configs main / socratic, Parquet train and test splits
    with the columns question and answer."""
    import datasets

    root = tmp_path_factory.mktemp("hub") / "gsm8k"
    for config in ("main", "socratic"):
        (root / config).mkdir(parents=True)
        for split, n in (("train", 40), ("test", 12)):
            rows = {"question": [f"Tom has {i} apples and buys {i} more. How many apples has he?" for i in range(n)],
                    "answer": [gsm8k_answer(i) for i in range(n)]}
            datasets.Dataset.from_dict(rows).to_parquet(str(root / config / f"{split}-00000-of-00001.parquet"))
    (root / "README.md").write_text(GSM8K_README)
    return root


def test_gsm8k_by_load_dataset_with_a_column_map_and_its_answer_pattern(gsm8k_dir, tokenizer):
    source = FileSource(train=str(gsm8k_dir), test=str(gsm8k_dir), name="main", val_fraction=0.25, seed=0)
    dm = LMDataModule(source, tokenizer, kind="prompt", max_length=128, columns={"prompt": "question"},
                      answer_pattern="#### (.*)")
    dm.setup("fit")
    assert [len(dm.examples[s]) for s in ("train", "val", "test")] == [30, 10, 12]
    for e in dm.examples["test"]:
        i = int(e["prompt"].split()[2])
        assert e["reference"] == str(2 * i) and e["prompt"].endswith("How many apples has he?")
        assert e["where"] == f"{gsm8k_dir}[test][row {i}]"
    # SFT on the worked solutions: the same column twice, under two of our keys
    sft = LMDataModule(source, tokenizer, kind="sft", max_length=256,
                       columns={"prompt": "question", "completion": "answer"})
    sft.setup("fit")
    assert sft.examples["test"][3]["reference"] == gsm8k_answer(3)


def test_math_schema_from_one_json_file_scores_with_math_verify(tmp_path, tokenizer):
    """MATH (hendrycks): problem, level, type, solution with the answer in its last \\boxed{}; the reference is the
    solution, and math_verify reads its boxed answer."""
    from genlight.rewards import MathVerify

    rows = [{"problem": "What is $\\frac{1}{2}+\\frac{1}{4}$?", "level": "Level 1", "type": "Algebra",
             "solution": "We have $\\frac{1}{2}+\\frac{1}{4}=\\frac{2}{4}+\\frac{1}{4}=\\boxed{\\frac{3}{4}}$."},
            {"problem": "Find the set of roots of $x^2-3x+2$.", "level": "Level 2", "type": "Algebra",
             "solution": "It factors as $(x-1)(x-2)$, so the roots are $\\boxed{\\{1,2\\}}$."}]
    path = tmp_path / "math.json"
    path.write_text("\n".join(json.dumps(r) for r in rows))
    source = FileSource(train=str(path), val=str(path))
    dm = LMDataModule(source, tokenizer, kind="prompt", max_length=128,
                      columns={"prompt": "problem", "answer": "solution"})
    dm.setup("fit")
    m = MathVerify()
    m.check_references(dm.examples["val"], "val")
    refs = [e["reference"] for e in dm.examples["val"]]
    assert m("so the answer is \\boxed{0.75}", refs[0]) == 1.0 and m("\\boxed{\\frac{2}{3}}", refs[0]) == 0.0
    assert m("The roots: \\boxed{\\{2, 1\\}}", refs[1]) == 1.0
    assert dm.examples["val"][0]["where"] == f"{path}[train][row 0]"


def test_column_map_and_answer_pattern_errors_name_the_row(gsm8k_dir, tokenizer):
    source = FileSource(train=str(gsm8k_dir), test=str(gsm8k_dir), name="main")
    with pytest.raises(DataError, match=r"gsm8k\[train\]\[row \d+\]: data.columns.prompt='query': no such column; "
                                        r"the row's columns are \['answer', 'question'\]"):
        LMDataModule(source, tokenizer, kind="prompt", columns={"prompt": "query"}).setup("fit")
    with pytest.raises(DataError, match=r"\[row \d+\]: data.answer_pattern='ANSWER: \(\.\*\)' matches nothing in the "
                                        r"answer '.*#### \d+'"):
        LMDataModule(source, tokenizer, kind="prompt", columns={"prompt": "question"},
                     answer_pattern="ANSWER: (.*)").setup("fit")
    with pytest.raises(ValueError, match=r"data.answer_pattern='\(': not a regular expression"):
        RowMap(source, answer_pattern="(")
    with pytest.raises(DataError, match=r"data.source.train=.*gsm8k.* \(data.source.name='nope', split 'train'\): "
                                        r"datasets.load_dataset failed: BuilderConfig 'nope' not found"):
        FileSource(train=str(gsm8k_dir), name="nope").rows("train")
    with pytest.raises(DataError, match=r"split 'validation'\): datasets.load_dataset failed: Unknown split"):
        FileSource(train=str(gsm8k_dir), val=str(gsm8k_dir), name="main").rows("val")


def test_a_hub_name_offline_fails_at_once_saying_to_pass_a_local_path(monkeypatch):
    """No network (here: an endpoint nothing listens on, so the test means the same on a machine with one): one
    connection attempt, then an error that says what to pass; not datasets' retry loop."""
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "ENDPOINT", "http://127.0.0.1:9")
    for proxy in ("HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy", "ALL_PROXY"):
        monkeypatch.delenv(proxy, raising=False)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("HF_DATASETS_OFFLINE", raising=False)
    with pytest.raises(DataError, match=r"data.source.train='openai/gsm8k' is not a local path, and the Hugging Face "
                                        r"Hub is unreachable from here: pass a local path"):
        FileSource(train="openai/gsm8k", name="main").rows("train")


def test_chat_prompts_go_through_the_template_with_the_system_prompt(tmp_path, tokenizer):
    path = tmp_path / "p.jsonl"
    path.write_text(json.dumps({"question": "1+1=", "answer": "2"}) + "\n")
    dm = LMDataModule(FileSource(train=str(path), val=str(path)), tokenizer, kind="prompt", max_length=64,
                      columns={"prompt": "question"}, chat=True, system_prompt="Be brief.")
    dm.setup("fit")
    want = tokenizer.apply_chat_template([{"role": "system", "content": "Be brief."}, {"role": "user", "content": "1+1="}],
                                         add_generation_prompt=True, tokenize=False)
    assert dm.examples["val"][0]["prompt"] == want


def test_the_gsm8k_preset_composes_and_reads_gsm8k(cfg_factory, gsm8k_dir, hf_dir):
    """experiment=gsm8k (for a GPU with the hub): math_verify, LoRA, vLLM, the chat template; its data settings read
    GSM8K's schema (here from the local copy of the repository, the same load_dataset call as the hub name)."""
    import hydra

    from genlight.lightning_modules.rlvr import RLVRModule
    from genlight.rewards import MathVerify

    cfg = cfg_factory("experiment=gsm8k", f"model.pretrained={hf_dir}", quick=False)
    assert cfg.data.source.train == "openai/gsm8k" and cfg.data.source.name == "main"
    assert cfg.rollout._target_.endswith("VLLMRollout") and cfg.model.lora.r == 16 and cfg.trainer.accelerator == "gpu"
    RLVRModule.check_config(cfg)
    assert isinstance(hydra.utils.instantiate(cfg.reward), MathVerify)
    cfg.data.source.train = cfg.data.source.test = str(gsm8k_dir)
    tok = hydra.utils.instantiate(cfg.model.tokenizer)
    dm = hydra.utils.instantiate(cfg.data, tokenizer=tok)
    dm.setup("fit")
    e = dm.examples["test"][5]
    assert e["reference"] == "10" and "put your final answer within \\boxed{}" in e["prompt"]
    assert "Tom has 5 apples" in e["prompt"]
    MathVerify().check_references(dm.examples["train"], "train")


def test_two_local_directories_of_one_name_are_read_each_as_itself(tmp_path):
    """datasets' own cache would serve the second `data/gsm8k` the first one's rows (it keys a local directory by
    its folder name and config): each is read as itself."""
    import datasets

    seen = []
    for k, n in enumerate((3, 5)):
        root = tmp_path / str(k) / "gsm8k"
        root.mkdir(parents=True)
        datasets.Dataset.from_dict({"question": [f"q{k}"] * n, "answer": ["#### 1"] * n}).to_parquet(
            str(root / "train-00000-of-00001.parquet"))
        source = FileSource(train=str(root), val_fraction=0.0)
        seen.append([r["question"] for _, r in source.rows("train") + source.rows("val")])
    assert seen == [["q0"] * 3, ["q1"] * 5]
