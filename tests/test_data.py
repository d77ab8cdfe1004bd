"""Data: the arithmetic task's splits and verifier, batching, and clear errors for bad files."""

from __future__ import annotations

import json
import logging

import pytest
import torch

from genlight.datamodules.arithmetic import ArithmeticTask
from genlight.datamodules.files import DataError, FileSource
from genlight.datamodules.lm import IGNORE, LMDataModule
from tests.conftest import write_jsonl


def test_arithmetic_splits_are_disjoint_seeded_and_correct():
    task = ArithmeticTask(digits=2, ops=["+", "-", "*"], n_train=3000, n_val=300, n_test=300, seed=7)
    prompts = {s: [r["prompt"] for _, r in task.rows(s)] for s in ("train", "val", "test")}
    assert [len(prompts[s]) for s in prompts] == [3000, 300, 300]
    all_prompts = sum(prompts.values(), [])
    assert len(set(all_prompts)) == len(all_prompts), "a problem appears twice"
    for _, r in task.rows("val"):
        assert r["prompt"].endswith("=")
        assert str(eval(r["prompt"][:-1])) == r["answer"] == r["completion"]  # test-only check of our generator
    again = ArithmeticTask(digits=2, ops=["+", "-", "*"], n_train=3000, n_val=300, n_test=300, seed=7)
    assert [r for _, r in again.rows("test")] == [r for _, r in task.rows("test")]
    other = ArithmeticTask(digits=2, ops=["+", "-", "*"], n_train=3000, n_val=300, n_test=300, seed=8)
    assert [r for _, r in other.rows("test")] != [r for _, r in task.rows("test")]


def test_arithmetic_bad_config_names_the_key():
    with pytest.raises(ValueError, match="exceeds the 100 distinct problems"):
        ArithmeticTask(digits=1, n_train=90, n_val=10, n_test=1)
    with pytest.raises(ValueError, match=r"data.source.ops=\['/'\]"):
        ArithmeticTask(ops=["/"])


def test_char_tokenizer_words_are_single_tokens_that_round_trip(tmp_path):
    """`char_tokenizer(words=...)`: each string is one token wherever it appears (the longer of two that share a start
    wins), everything else stays characters, decoding gives the text back, and the tokenizer saves and loads as any HF
    one (an exported checkpoint keeps them)."""
    from genlight.models.tokenizer import char_tokenizer, load_tokenizer

    call = '<tool_call>{"name": "move", "arguments": {"action": "['
    tok = char_tokenizer(words=["<|tool|>", "<|tools|>move(action)\n", call, "higher"])
    plain = char_tokenizer()
    assert len(tok) == len(plain) + 4
    text = f'<|tools|>move(action)\n{call}7]"}}}}</tool_call><|tool|>higher than 7, highe'
    ids = tok(text, add_special_tokens=False).input_ids
    words = [tok.convert_ids_to_tokens(i) for i in ids]
    assert words[:2] == ["<|tools|>move(action)\n", call] and "<|tool|>" in words and "higher" in words
    assert len(ids) == 4 + len('7]"}}</tool_call>') + len(" than 7, highe")
    assert tok.decode(ids) == text
    tok.save_pretrained(tmp_path)
    assert load_tokenizer(str(tmp_path))(text, add_special_tokens=False).input_ids == ids
    with pytest.raises(ValueError, match="model.tokenizer.words: each must be a non-empty string"):
        char_tokenizer(words=["ok", ""])


def test_sft_batch_masks_prompt_and_padding(tokenizer):
    dm = LMDataModule(ArithmeticTask(n_train=8, n_val=4, n_test=4), tokenizer, batch_size=8)
    dm.setup()
    batch = next(iter(dm.val_dataloader()))
    for i, (prompt, ref) in enumerate(zip(batch["prompts"], batch["references"])):
        ids, labels = batch["input_ids"][i], batch["labels"][i]
        n_prompt = len(tokenizer(prompt).input_ids)
        scored = labels[labels != IGNORE].tolist()
        # only the answer and <eos> are scored, and they sit right after the prompt
        assert scored == tokenizer(ref, add_special_tokens=False).input_ids + [tokenizer.eos_token_id]
        assert (labels[:n_prompt] == IGNORE).all()
        assert ids[n_prompt : n_prompt + len(scored)].tolist() == scored
        # the generation prompt is left-padded and ends at "="
        p, m = batch["prompt_input_ids"][i], batch["prompt_attention_mask"][i]
        assert tokenizer.decode(p[m.bool()], skip_special_tokens=True) == prompt
        assert m[-1] == 1


def _dm(tokenizer, path, **kw) -> LMDataModule:
    dm = LMDataModule(FileSource(train=str(path)), tokenizer, **kw)
    dm.setup()
    return dm


def test_jsonl_malformed_line_names_file_and_line(tmp_path, tokenizer):
    path = write_jsonl(tmp_path / "bad.jsonl", [{"prompt": "1+1=", "completion": "2"}, '{"prompt": "2+2=", '])
    with pytest.raises(DataError, match=rf"{path}:2: malformed JSON"):
        _dm(tokenizer, path)


def test_jsonl_with_a_utf8_byte_order_mark_reads_every_row(tmp_path, tokenizer):
    """Excel and Notepad write a BOM; it is not data. Later errors still name their line."""
    rows = [{"prompt": f"{a}+1=", "completion": str(a + 1)} for a in range(20)]
    path = tmp_path / "bom.jsonl"
    path.write_bytes(b"\xef\xbb\xbf" + "\n".join(json.dumps(r) for r in rows).encode())
    dm = _dm(tokenizer, path)
    got = {e["prompt"] for split in ("train", "val") for e in dm.examples[split]}
    assert got == {r["prompt"] for r in rows}
    path.write_bytes(b"\xef\xbb\xbf" + (json.dumps(rows[0]) + "\n{bad\n").encode())
    with pytest.raises(DataError, match=rf"{path}:2: malformed JSON"):
        _dm(tokenizer, path)


def test_jsonl_missing_key_names_line_and_key(tmp_path, tokenizer):
    path = write_jsonl(tmp_path / "bad.jsonl", [{"prompt": "1+1=", "completion": "2"}] * 3 + [{"prompt": "x"}])
    with pytest.raises(DataError, match=rf"{path}:4: missing key 'completion'"):
        _dm(tokenizer, path)


def test_jsonl_empty_file(tmp_path, tokenizer):
    path = tmp_path / "empty.jsonl"
    path.write_text("\n\n")
    with pytest.raises(DataError, match=rf"{path}: empty file"):
        _dm(tokenizer, path)
    with pytest.raises(FileNotFoundError, match="nope.jsonl"):
        _dm(tokenizer, tmp_path / "nope.jsonl")


def test_jsonl_empty_completion_is_an_error(tmp_path, tokenizer):
    path = write_jsonl(tmp_path / "bad.jsonl", [{"prompt": "1+1=", "completion": "2"}, {"prompt": "a", "completion": "  "}])
    with pytest.raises(DataError, match=rf"{path}:2: empty string for key 'completion'"):
        _dm(tokenizer, path)


def test_overlong_example_errors_or_is_counted(tmp_path, tokenizer, caplog):
    rows = [{"prompt": "1+1=", "completion": "2"}] * 9 + [{"prompt": "long=", "completion": "9" * 50}]
    path = write_jsonl(tmp_path / "long.jsonl", rows)
    src = FileSource(train=str(path), val=str(path))
    with pytest.raises(DataError, match=rf"{path}:10: example is 57 tokens .* data.max_length=20"):
        LMDataModule(src, tokenizer, max_length=20).setup()
    with caplog.at_level(logging.WARNING):
        dm = LMDataModule(src, tokenizer, max_length=20, truncation="truncate")
        dm.setup()
    assert "truncated 1 of 10 examples" in caplog.text
    assert len(dm.examples["val"]) == 10  # nothing dropped
    assert max(len(e["prompt_ids"]) + len(e["completion_ids"]) for e in dm.examples["val"]) == 20


def test_chat_messages_use_the_chat_template(sft_jsonl, tokenizer):
    dm = _dm(tokenizer, sft_jsonl, batch_size=64)
    chat = [e for split in dm.examples.values() for e in split if e["prompt"].startswith("<s><|user|>")]
    assert chat, "chat rows were not rendered with the template"
    e = chat[0]
    # the template wrote <bos> itself: it is not doubled
    assert e["prompt_ids"][:2] != [tokenizer.bos_token_id] * 2
    assert e["prompt"].endswith("<|assistant|>")
    assert tokenizer.decode(e["completion_ids"], skip_special_tokens=True) == e["reference"]


@pytest.mark.parametrize("packing", [False, True])
def test_a_conversation_trains_every_assistant_turn_or_its_last(tmp_path, tokenizer, caplog, packing):
    """A row of chat messages with two assistant turns: `assistant_turns=all` scores both turns (each with its
    <eos>) and nothing of the user's turns, packed or not; `last` (the default) scores the last turn only and says
    that the earlier one trains as prompt."""
    talk = [{"role": "user", "content": "2*3"}, {"role": "assistant", "content": "6"},
            {"role": "user", "content": "times 7"}, {"role": "assistant", "content": "42"}]
    path = write_jsonl(tmp_path / "t.jsonl", [{"messages": talk}] * 4)
    eos = tokenizer.eos_token_id
    scored = {}
    for turns in ("all", "last"):
        with caplog.at_level(logging.WARNING):
            dm = _dm(tokenizer, path, batch_size=2, assistant_turns=turns, packing=packing)
        batch = dm.collate(dm.examples["train"][:1])
        ids, labels = batch["input_ids"][0], batch["labels"][0]
        scored[turns] = labels[labels != IGNORE].tolist()
        assert ids[labels != IGNORE].tolist() == scored[turns]  # a label is the token at its place
        if turns == "all":
            # the first turn is what generation from the prompt writes: greedy exact match compares with it
            assert dm.examples["train"][0]["reference"] == "6"
            assert dm.examples["train"][0]["prompt"].endswith("2*3\n<|assistant|>")
    digits = lambda text: tokenizer(text, add_special_tokens=False).input_ids  # noqa: E731
    assert scored["all"] == digits("6") + [eos] + digits("42") + [eos]
    assert scored["last"] == digits("42") + [eos]
    assert "hold assistant turns before their last" in caplog.text


def test_a_conversation_the_template_renders_differently_is_named(tmp_path, tokenizer):
    """A template that rewrites earlier assistant turns once later messages follow (as reasoning templates drop
    earlier thinking) cannot be cut into trained turns: the row is named, not trained on a mismatched context."""
    from genlight.models.tokenizer import char_tokenizer

    tok = char_tokenizer()
    tok.chat_template = ("{% for m in messages %}{% if m.role == 'assistant' and not loop.last %}<|assistant|>x</s>"
                         "{% else %}<|{{ m.role }}|>{{ m.content }}{% if m.role == 'assistant' %}</s>{% endif %}"
                         "{% endif %}\n{% endfor %}{% if add_generation_prompt %}<|assistant|>{% endif %}")
    talk = [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"},
            {"role": "user", "content": "c"}, {"role": "assistant", "content": "d"}]
    path = write_jsonl(tmp_path / "t.jsonl", [{"messages": talk}])
    with pytest.raises(DataError, match=r"t\.jsonl:1: the chat template renders assistant turn 1 differently"):
        _dm(tok, path, assistant_turns="all")
    path = write_jsonl(tmp_path / "u.jsonl", [{"messages": talk[1:]}])
    with pytest.raises(DataError, match=r"u\.jsonl:1: 'messages' starts with an assistant turn"):
        _dm(tokenizer, path, assistant_turns="all")
    with pytest.raises(ValueError, match="data.assistant_turns='every'"):
        _dm(tokenizer, path, assistant_turns="every")


def test_val_fraction_holds_out_without_losing_rows(sft_jsonl, tokenizer):
    dm = _dm(tokenizer, sft_jsonl)
    assert len(dm.examples["train"]) + len(dm.examples["val"]) == 50
    assert len(dm.examples["val"]) == round(0.05 * 50)


def test_hf_datasets_from_disk(tmp_path, tokenizer):
    import datasets

    ds = datasets.Dataset.from_list([{"prompt": f"{i}+0=", "completion": str(i)} for i in range(20)])
    ds.save_to_disk(str(tmp_path / "ds"))
    dm = _dm(tokenizer, tmp_path / "ds")
    assert len(dm.examples["train"]) + len(dm.examples["val"]) == 20
    bad = datasets.Dataset.from_list([{"prompt": "a", "completion": "b"}, {"prompt": "c", "answer": "d"}])
    bad.save_to_disk(str(tmp_path / "bad"))
    with pytest.raises(DataError, match=r"bad\[row 1\]: missing key 'completion'"):
        _dm(tokenizer, tmp_path / "bad")
    datasets.DatasetDict({"train": ds}).save_to_disk(str(tmp_path / "dd"))
    with pytest.raises(DataError, match="DatasetDict with splits"):
        _dm(tokenizer, tmp_path / "dd")


def test_collate_is_tensor_typed(tokenizer):
    dm = LMDataModule(ArithmeticTask(n_train=4, n_val=4, n_test=4), tokenizer, batch_size=4)
    dm.setup()
    b = next(iter(dm.train_dataloader()))
    assert b["input_ids"].dtype == torch.long and b["input_ids"].shape == b["labels"].shape


def test_a_split_the_processes_do_not_divide_is_said_to_count_rows_twice(tokenizer, caplog):
    """Under DDP Lightning's DistributedSampler repeats rows to even a split out over the processes, and the split's
    metrics then count them twice: said once, with the sizes; a split the processes divide is silent."""
    import types

    dm = LMDataModule(ArithmeticTask(n_train=32, n_val=15, n_test=16), tokenizer, kind="sft", batch_size=4)
    dm.setup("fit")
    dm.trainer = types.SimpleNamespace(world_size=2)
    dm.val_dataloader()
    dm.val_dataloader()
    dm.test_dataloader()
    said = [r.getMessage() for r in caplog.records if "repeats" in r.getMessage()]
    assert said == ["val split: 15 rows over 2 processes: Lightning repeats 1 of them to even the processes out, and val "
                    "metrics count those twice; give the split a multiple of 2 rows (data.source.n_val)"]
