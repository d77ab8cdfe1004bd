"""The language-model DataModule: rows from a source (the arithmetic task, or files), tokenized
into the shape an algorithm needs (`kind`, a `RowKind` registered by name in `ROW_KINDS`):

- `sft`: prompt + completion, loss on completion tokens only (labels = -100 on the prompt); a conversation with
  several assistant turns trains its last (`assistant_turns=last`) or every one (`all`, TRL's `assistant_only_loss`).
- `preference`: prompt + chosen + rejected, optional margin (DPO family, the reward model).
- `prompt`: prompt + answer to verify (RLVR).
An algorithm with rows of its own names their `RowKind` in its YAML by import path (`data.kind:
genlight.lightning_modules.kto.UNPAIRED`): nothing needs importing first, and nothing here changes.

Every kind also carries the left-padded prompt and the reference text, for evaluation by generation.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import NamedTuple

import lightning as L
import torch
from torch.utils.data import DataLoader

from genlight.datamodules.files import DataError, RowMap
from genlight.datamodules.packing import IGNORE, pack, pack_pairs
from genlight.datamodules.sampler import ResumableTrainData
from genlight.models.tokenizer import CHAT_TEMPLATE, after_assistant_turn

log = logging.getLogger(__name__)


# --------------------------------------------------------------------------- rows -> text
def _is_messages(value) -> bool:
    return isinstance(value, list) and all(isinstance(m, dict) and "role" in m and "content" in m for m in value)


def render_prompt(value, tokenizer, where: str, key: str, tools: list[dict] | None = None) -> tuple[str, bool]:
    """Prompt text, and whether it was rendered by the chat template (which then holds <bos>); `tools`: the JSON
    schemas the template shows (a row's "tools", TRL's column)."""
    if isinstance(value, str):
        if not value:
            raise DataError(f"{where}: empty string for key {key!r}")
        return value, False
    if _is_messages(value) and value:
        template = tokenizer.chat_template or CHAT_TEMPLATE
        text = tokenizer.apply_chat_template(value, add_generation_prompt=True, tokenize=False, chat_template=template,
                                             tools=tools or None)
        return text, True
    raise DataError(f"{where}: key {key!r} must be a non-empty string or a list of chat messages")


def chat_renderer(tokenizer, tools: list[dict] | None):
    """(render(messages, add_generation_prompt) -> text, the template's end of an assistant turn) of `tokenizer`'s
    chat template (the default's when it has none)."""
    template = tokenizer.chat_template or CHAT_TEMPLATE
    render = lambda m, gen: tokenizer.apply_chat_template(  # noqa: E731
        m, add_generation_prompt=gen, tokenize=False, chat_template=template, tools=tools or None)
    return render, after_assistant_turn(tokenizer, [], add_generation_prompt=False, template=template) or ""


def cut_turn(render, end: str, msgs: list[dict], i: int) -> tuple[str, str | None]:
    """(the text before assistant turn `msgs[i]`, its generation prompt included; the text the template writes for the
    turn without its end of turn: its <eos> ends it, as the policy's sampled <eos> does). The turn is None when the
    template renders what comes before it differently once the turn follows (it cannot be cut out as a completion)."""
    before, full = render(msgs[:i], True), render(msgs[: i + 1], False)
    if not full.startswith(before):
        return before, None
    turn = full[len(before):]
    return before, turn[: len(turn) - len(end)] if end and turn.endswith(end) else turn


def tool_call_turn(msgs: list[dict], tokenizer, tools: list[dict] | None, where: str) -> str:
    """The text the chat template writes for the last message, an assistant turn with `tool_calls` (a tool-use
    demonstration), without its end of turn."""
    _, turn = cut_turn(*chat_renderer(tokenizer, tools), msgs, len(msgs) - 1)
    if turn is None:
        raise DataError(f"{where}: the chat template renders the conversation before the last assistant turn "
                        "differently with and without it; its tool-call turn cannot be cut out as a completion")
    return turn


def render_completion(value, where: str, key: str) -> str:
    if _is_messages(value):
        if len(value) != 1 or value[0]["role"] != "assistant":
            raise DataError(f"{where}: key {key!r} must hold exactly one assistant message")
        value = value[0]["content"]
    if not isinstance(value, str):
        raise DataError(f"{where}: key {key!r} must be a string, got {type(value).__name__}")
    if not value.strip():
        raise DataError(f"{where}: empty string for key {key!r}")
    return value


def require_keys(row: dict, keys: Sequence[str], where: str, formats: str) -> None:
    missing = [k for k in keys if k not in row]
    if missing:
        raise DataError(f"{where}: missing key {missing[0]!r} (rows must be {formats}); got keys {sorted(row)}")


SFT_FORMATS = '{"prompt", "completion"} or {"messages": [...]}'
PREF_FORMATS = '{"prompt", "chosen", "rejected"}'
PROMPT_FORMATS = '{"prompt", "answer"} or {"messages": [...], "answer"}'


def sft_text(row: dict, tokenizer, where: str) -> tuple[str, str, bool]:
    """(prompt, completion, templated) of an SFT row: plain or chat messages ending with the assistant."""
    if "messages" in row:
        msgs = row["messages"]
        if not _is_messages(msgs) or len(msgs) < 2 or msgs[-1]["role"] != "assistant":
            raise DataError(f"{where}: 'messages' must be a list of {{role, content}} ending with an assistant turn")
        tools = row.get("tools")
        prompt, templated = render_prompt(msgs[:-1], tokenizer, where, "messages", tools)
        if msgs[-1].get("tool_calls"):  # a tool-use demonstration: the policy learns to write the call
            return prompt, tool_call_turn(msgs, tokenizer, tools, where), templated
        return prompt, render_completion(msgs[-1]["content"], where, "messages[-1].content"), templated
    require_keys(row, ("prompt", "completion"), where, SFT_FORMATS)
    if row.get("label", True) is not True:  # an unpaired-preference row (KTO's): SFT would imitate a bad completion
        raise DataError(f"{where}: 'label' is {row['label']!r}: an undesirable completion, which SFT would learn to "
                        "write; keep only rows with label true (the KTO warm start does: warm_start.kind)")
    prompt, templated = render_prompt(row["prompt"], tokenizer, where, "prompt")
    return prompt, render_completion(row["completion"], where, "completion"), templated


def check_assistant_turns(value: str) -> None:
    if value not in ("last", "all"):
        raise ValueError(f"data.assistant_turns={value!r}: must be 'last' or 'all'")


def assistant_turns(row: dict) -> int:
    msgs = row.get("messages")
    return sum(m["role"] == "assistant" for m in msgs) if _is_messages(msgs) else 0


def conversation_segments(msgs: list[dict], tokenizer, tools: list[dict] | None, where: str
                          ) -> tuple[str, list[tuple[str, bool]]]:
    """A conversation with every assistant turn trained (`assistant_turns=all`): the prompt before its first assistant
    turn, then the text after it in pieces (text, trained). Each assistant turn is the text the chat template writes
    for it without its end of turn (its <eos> ends it, as the policy's sampled <eos> ends a turn); the template's text
    between turns (its end of turn after the <eos>, tool results, user turns, the next generation prompt) is not
    trained. So the ids are those a multi-turn episode (src/envs/episodes.py) builds from the same turns."""
    render, end = chat_renderer(tokenizer, tools)
    eos = tokenizer.eos_token or ""
    turns = [i for i, m in enumerate(msgs) if m["role"] == "assistant"]
    if turns[0] == 0:
        raise DataError(f"{where}: 'messages' starts with an assistant turn: no prompt comes before it")
    prompt = render(msgs[: turns[0]], True)
    segments, done = [], prompt  # done: the text the segments cover so far
    for k, i in enumerate(turns):
        before, turn = cut_turn(render, end, msgs, i)
        changed = k if not before.startswith(done) else k + 1 if turn is None else 0
        if changed:
            raise DataError(f"{where}: the chat template renders assistant turn {changed} differently once later "
                            "messages follow it; its turns cannot be cut out as completions (data.assistant_turns=last "
                            "trains the last turn only)")
        if k:
            between = before[len(done):]
            segments.append((between[len(eos):] if eos and between.startswith(eos) else between, False))
        if not turn.strip():
            raise DataError(f"{where}: assistant turn {k + 1} is empty")
        segments.append((turn, True))
        done = before + turn
    return prompt, segments


def preference_text(row: dict, tokenizer, where: str) -> tuple[str, str, str, bool]:
    """(prompt, chosen, rejected, templated) of a preference row (TRL's format, plain or chat)."""
    require_keys(row, ("prompt", "chosen", "rejected"), where, PREF_FORMATS)
    prompt, templated = render_prompt(row["prompt"], tokenizer, where, "prompt")
    chosen = render_completion(row["chosen"], where, "chosen")
    rejected = render_completion(row["rejected"], where, "rejected")
    if chosen == rejected:
        raise DataError(f"{where}: 'chosen' and 'rejected' are identical; a pair must differ")
    return prompt, chosen, rejected, templated


def preference_margin(row: dict, where: str) -> float:
    """A pair's optional `margin` (how much better chosen is: the reward model's Bradley-Terry margin); 0 if absent."""
    m = row.get("margin", 0.0)
    if isinstance(m, bool) or not isinstance(m, int | float) or m != m or abs(m) == float("inf"):
        raise DataError(f"{where}: 'margin' must be a finite number, got {m!r}")
    return float(m)


def prompt_text(row: dict, tokenizer, where: str) -> tuple[str, str, bool]:
    """(prompt, answer, templated) of an RL prompt row."""
    key = "messages" if "messages" in row and "prompt" not in row else "prompt"
    require_keys(row, (key, "answer"), where, PROMPT_FORMATS)
    prompt, templated = render_prompt(row[key], tokenizer, where, key)
    answer = row["answer"]
    if not isinstance(answer, str | int | float) or str(answer).strip() == "":
        raise DataError(f"{where}: 'answer' must be a non-empty string or number")
    # a str subclass stays itself (reasoning-gym's Reference carries the entry its scorer reads)
    return prompt, answer if isinstance(answer, str) else str(answer), templated


# --------------------------------------------------------------------------- text -> ids
def completion_ids(tokenizer, text: str) -> list[int]:
    """A completion's ids as training sees them: its text without specials, then <eos> (where the tokenizer has one)."""
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    return ids + ([tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else [])


class Tokenized:
    """Tokenizes prompts and completions; enforces `max_length` (error, or counted truncation). `assistant_turns`:
    which assistant turns of a conversation an SFT example trains (`last` or `all`)."""

    def __init__(self, tokenizer, max_length: int, truncation: str, split: str, assistant_turns: str = "last"):
        if truncation not in ("error", "truncate"):
            raise ValueError(f"data.truncation={truncation!r}: must be 'error' or 'truncate'")
        check_assistant_turns(assistant_turns)
        self.tok, self.max_length, self.truncation, self.split = tokenizer, max_length, truncation, split
        self.assistant_turns = assistant_turns
        self.n_truncated, self.n_earlier_turns = 0, 0

    def prompt(self, text: str, templated: bool) -> list[int]:
        # A chat template writes <bos> itself; a plain prompt gets the tokenizer's own specials.
        return self.tok(text, add_special_tokens=not templated)["input_ids"]

    def completion(self, text: str) -> list[int]:
        return completion_ids(self.tok, text)

    def fit(self, prompt: list[int], completion: list[int], where: str) -> list[int]:
        """The completion, cut so that prompt + completion <= max_length (or an error)."""
        total = len(prompt) + len(completion)
        if total <= self.max_length:
            return completion
        keep = self.max_length - len(prompt)
        if self.truncation == "error" or keep < 1:
            raise DataError(
                f"{where}: example is {total} tokens (prompt {len(prompt)}), longer than "
                f"data.max_length={self.max_length}; raise data.max_length or set data.truncation=truncate"
            )
        self.n_truncated += 1
        return completion[:keep]

    def report(self, n: int) -> None:
        if self.n_truncated:
            log.warning(
                "%s split: truncated %d of %d examples to data.max_length=%d tokens",
                self.split, self.n_truncated, n, self.max_length,
            )
        if self.n_earlier_turns:
            log.warning("%s split: %d of %d conversations hold assistant turns before their last, which train as prompt "
                        "only (data.assistant_turns=last); data.assistant_turns=all trains every one (for rows that "
                        "each hold a whole conversation: rows that repeat its beginning would train those turns again)",
                        self.split, self.n_earlier_turns, n)


def sft_example(row: dict, t: Tokenized, where: str) -> dict:
    if assistant_turns(row) > 1:
        if t.assistant_turns == "all":
            return conversation_example(row, t, where)
        t.n_earlier_turns += 1
    prompt, completion, templated = sft_text(row, t.tok, where)
    p = t.prompt(prompt, templated)
    return {"prompt": prompt, "prompt_ids": p, "completion_ids": t.fit(p, t.completion(completion), where),
            "reference": completion}


def conversation_example(row: dict, t: Tokenized, where: str) -> dict:
    """An SFT example that trains every assistant turn: `completion_ids` runs from the first assistant turn to the
    end of the last, `completion_labels` holds them with -100 on the text between turns (tool results, user turns);
    the reference (greedy exact match) is the first turn, what generation from the prompt writes."""
    msgs = row["messages"]
    if msgs[-1]["role"] != "assistant":
        raise DataError(f"{where}: 'messages' must be a list of {{role, content}} ending with an assistant turn")
    prompt, segments = conversation_segments(msgs, t.tok, row.get("tools"), where)
    p = t.prompt(prompt, True)
    ids, labels = [], []
    for text, trained in segments:
        piece = t.completion(text) if trained else t.tok(text, add_special_tokens=False)["input_ids"]
        ids += piece
        labels += piece if trained else [IGNORE] * len(piece)
    ids = t.fit(p, ids, where)
    return {"prompt": prompt, "prompt_ids": p, "completion_ids": ids, "completion_labels": labels[: len(ids)],
            "reference": segments[0][0]}


def preference_example(row: dict, t: Tokenized, where: str) -> dict:
    prompt, chosen, rejected, templated = preference_text(row, t.tok, where)
    p = t.prompt(prompt, templated)
    return {"prompt": prompt, "prompt_ids": p, "chosen_ids": t.fit(p, t.completion(chosen), where),
            "rejected_ids": t.fit(p, t.completion(rejected), where), "reference": row.get("answer", chosen),
            "margin": preference_margin(row, where)}


def prompt_example(row: dict, t: Tokenized, where: str) -> dict:
    prompt, answer, templated = prompt_text(row, t.tok, where)
    p = t.prompt(prompt, templated)
    if len(p) >= t.max_length:
        raise DataError(f"{where}: prompt is {len(p)} tokens, not shorter than data.max_length={t.max_length}")
    # the conversation itself, as the single-turn prompt above renders it (a chat prompt: its messages, a system
    # prompt included): a multi-turn run (src/envs/) renders it again with its tools and reset text
    key = "messages" if "messages" in row and "prompt" not in row else "prompt"
    chat = list(row[key]) if _is_messages(row[key]) else [{"role": "user", "content": row[key]}]
    # and the row's other columns: an environment's reset(**row) reads them (TRL's contract), e.g. a game's seed
    extra = {k: v for k, v in row.items() if k not in ("prompt", "messages", "answer")}
    return {"prompt": prompt, "prompt_ids": p, "reference": answer, "chat": chat, "columns": extra}


def build_examples(rows, tokenizer, kind: str, split: str, max_length: int, truncation: str,
                   assistant_turns: str = "last") -> list[dict]:
    """Each (where, row) of a split as the example of its `kind` (`ROW_KINDS`), with its position in the split and
    its origin (`where`: a check before training names the row)."""
    t = Tokenized(tokenizer, max_length, truncation, split, assistant_turns)
    make = row_kind(kind).example
    out = [{**make(row, t, where), "index": index, "where": where} for index, (where, row) in enumerate(rows)]
    t.report(len(out))
    return out


# --------------------------------------------------------------------------- batching
def pad(seqs: list[list[int]], value: int, left: bool = False) -> torch.Tensor:
    n = max(len(s) for s in seqs)
    rows = [([value] * (n - len(s)) + s) if left else (s + [value] * (n - len(s))) for s in seqs]
    return torch.tensor(rows, dtype=torch.long)


def join(prompts: list[list[int]], completions: list[list[int]], pad_id: int,
         completion_labels: list[list[int]] | None = None) -> dict[str, torch.Tensor]:
    """Right-padded prompt+completion with labels = -100 outside the completion (and where `completion_labels`,
    one per completion, says -100)."""
    seqs = [p + c for p, c in zip(prompts, completions)]
    labels = [[IGNORE] * len(p) + c for p, c in zip(prompts, completion_labels or completions)]
    return {
        "input_ids": pad(seqs, pad_id),
        "attention_mask": pad([[1] * len(s) for s in seqs], 0),
        "labels": pad(labels, IGNORE),
    }


def collate_sft(examples: list[dict], prompts: list[list[int]], c: Collator) -> dict:
    completions = [e["completion_ids"] for e in examples]
    labels = [e.get("completion_labels", e["completion_ids"]) for e in examples]  # -100 between a conversation's turns
    if c.packing:
        return pack(prompts, completions, c.max_length, c.pad_id, labels)
    return join(prompts, completions, c.pad_id, labels)


def collate_preference(examples: list[dict], prompts: list[list[int]], c: Collator) -> dict:
    """Chosen rows then rejected rows: one forward pass computes both (B -> 2B); packed, each pair a prompt tree."""
    chosen, rejected = [e["chosen_ids"] for e in examples], [e["rejected_ids"] for e in examples]
    margins = {"margins": torch.tensor([e["margin"] for e in examples], dtype=torch.float32)}
    if c.packing:
        return margins | pack_pairs(prompts, chosen, rejected, 2 * c.max_length, c.pad_id)
    # the completions alone (right-padded) too, for a forward that encodes each prompt once
    return margins | join(prompts + prompts, chosen + rejected, c.pad_id) | {
        "completion_ids": pad(chosen + rejected, c.pad_id),
        "completion_mask": pad([[1] * len(x) for x in chosen + rejected], 0)}


class RowKind(NamedTuple):
    """What an algorithm reads: `example(row, tokenized, where)` makes a split's example of a file row (prompt,
    prompt_ids, reference, and its own fields; errors name `where`), `collate(examples, batch, collator)` adds its
    tensors (returned; the batch already holds the left-padded prompts, their texts, references and indices), `packs`
    whether `data.packing` applies, `rows(source, split, seed)` the (where, row) pairs of a split (None: the
    source's own `rows(split)`; a task may make an algorithm's rows, as the arithmetic task makes preference pairs),
    and `keys` the keys `collate` adds that every batch of the kind holds, packed or not (`batch_keys`; a module checks
    its first batches for them)."""

    example: Callable[[dict, Tokenized, str], dict]
    collate: Callable[[list[dict], list[list[int]], Collator], dict] | None = None
    packs: bool = False
    rows: Callable[[object, str, int], list[tuple[str, dict]]] | None = None
    keys: tuple[str, ...] = ()


# what every batch holds, whatever its kind (`Collator`): the prompts left-padded, their texts, the references, and each
# row's position in its split (DPO caches the reference's log-probs under it: it must identify the row in its split)
COMMON_KEYS = ("prompt_input_ids", "prompt_attention_mask", "prompts", "references", "index")


def batch_keys(kind: str) -> tuple[str, ...]:
    """The keys every batch of `kind` holds (docs/plugin.md has their shapes)."""
    return COMMON_KEYS + row_kind(kind).keys


def sft_rows(source, split: str, seed: int) -> list[tuple[str, dict]]:
    """A task may make its own SFT rows (`sft_rows`: the calculator task's tool-use demonstrations)."""
    if hasattr(source, "sft_rows"):
        return source.sft_rows(split)
    return source.rows(split)


def preference_rows(source, split: str, seed: int) -> list[tuple[str, dict]]:
    """A task makes its own pairs (`preference_rows`: the arithmetic task's corrupted answers, seeded); a file holds them."""
    if hasattr(source, "preference_rows"):
        return source.preference_rows(split, seed=seed)
    return source.rows(split)


# data.kind -> its rows: the built-in names, or any RowKind by import path (an algorithm's own, named in its YAML)
ROW_KINDS: dict[str, RowKind] = {
    "sft": RowKind(sft_example, collate_sft, packs=True, rows=sft_rows, keys=("input_ids", "labels")),
    "preference": RowKind(preference_example, collate_preference, packs=True, rows=preference_rows,
                          keys=("input_ids", "margins")),
    "prompt": RowKind(prompt_example),
}


def row_kind(name: str) -> RowKind:
    """The RowKind of `data.kind`: a built-in name, or the import path of a module-level RowKind."""
    if name in ROW_KINDS:
        return ROW_KINDS[name]
    if "." in name:
        import importlib

        module, _, attr = name.rpartition(".")
        try:
            kind = getattr(importlib.import_module(module), attr)
        except (ImportError, AttributeError) as e:
            raise ValueError(f"data.kind={name!r}: cannot import it ({e})") from None
        if isinstance(kind, RowKind):
            return kind
    raise ValueError(f"data.kind={name!r}: must be one of {list(ROW_KINDS)} or the import path of a RowKind")


class Collator:
    def __init__(self, kind: str, pad_id: int, packing: bool = False, max_length: int = 512):
        self.kind, self.pad_id, self.packing, self.max_length = kind, pad_id, packing, max_length
        self._collate = row_kind(kind).collate

    def __call__(self, examples: list[dict]) -> dict:
        prompts = [e["prompt_ids"] for e in examples]
        batch = {
            "prompt_input_ids": pad(prompts, self.pad_id, left=True),
            "prompt_attention_mask": pad([[1] * len(p) for p in prompts], 0, left=True),
            "prompts": [e["prompt"] for e in examples],
            "references": [e["reference"] for e in examples],
            **({"chats": [e["chat"] for e in examples], "columns": [e.get("columns", {}) for e in examples]}
               if "chat" in examples[0] else {}),
            "index": torch.tensor([e["index"] for e in examples]),  # position in its split (caches)
        }
        if self._collate is not None:
            batch.update(self._collate(examples, prompts, self))
        return batch


class LMDataModule(ResumableTrainData, L.LightningDataModule):
    """Rows from `source` (anything with `rows(split)`; through `RowMap` with `columns`, `answer_pattern`, `chat`)
    tokenized for `kind`."""

    def __init__(
        self,
        source,
        tokenizer,
        kind: str = "sft",
        batch_size: int = 64,
        eval_batch_size: int | None = None,
        max_length: int = 512,
        truncation: str = "error",
        num_workers: int = 0,
        seed: int = 42,
        packing: bool = False,
        columns: dict | None = None,
        answer_pattern: str | None = None,
        chat: bool | str = False,
        system_prompt: str | None = None,
        assistant_turns: str = "last",
    ):
        super().__init__()
        check_assistant_turns(assistant_turns)
        self.assistant_turns = assistant_turns
        if packing and not row_kind(kind).packs:
            raise ValueError(f"data.packing=true packs SFT examples and preference pairs; data.kind={kind!r} "
                             "does not use it (set data.packing=false)")
        if chat == "auto":  # the chat template when the model has one
            chat = bool(getattr(tokenizer, "chat_template", None))
        if columns or answer_pattern or chat:  # a dataset's own columns and answer format, read as ours
            source = RowMap(source, columns, answer_pattern, chat, system_prompt)
        self.source, self.tokenizer, self.kind = source, tokenizer, kind
        self.batch_size, self.eval_batch_size = batch_size, eval_batch_size or batch_size
        self.max_length, self.truncation, self.num_workers = max_length, truncation, num_workers
        self.seed = seed
        self.collate = Collator(kind, tokenizer.pad_token_id, packing, max_length)
        self.examples: dict[str, list[dict]] = {}
        self.retired: set[int] = set()  # train indices never to be sampled again (RLVR)
        self._warned: set[str] = set()

    def rows(self, split: str):
        make = row_kind(self.kind).rows
        return make(self.source, split, self.seed) if make is not None else self.source.rows(split)

    def has_split(self, split: str) -> bool:
        """Whether the data has this split (a file source without a test file has no test split)."""
        return split in getattr(self.source, "splits", ("train", "val", "test"))

    def setup(self, stage: str | None = None) -> None:
        for split in ("train", "val", "test"):
            if split not in self.examples and self.has_split(split):
                self.examples[split] = build_examples(
                    self.rows(split), self.tokenizer, self.kind, split, self.max_length, self.truncation,
                    self.assistant_turns)

    def train_dataloader(self) -> DataLoader:
        return self.train_loader(self.examples["train"], self.seed, self.batch_size, exclude=self.retired, **self._loader_kw())

    def val_dataloader(self) -> DataLoader:
        self._warn_if_padded("val")
        return DataLoader(self.examples["val"], batch_size=self.eval_batch_size, **self._loader_kw())

    def test_dataloader(self) -> DataLoader:
        if not self.has_split("test"):
            self.source.rows("test")  # raises, naming the key
        self._warn_if_padded("test")
        return DataLoader(self.examples["test"], batch_size=self.eval_batch_size, **self._loader_kw())

    def _warn_if_padded(self, split: str) -> None:
        """Under DDP, Lightning's DistributedSampler pads a split whose size the processes do not divide by repeating
        its first rows, so those rows count twice in the split's metrics (every process must take as many evaluation
        steps: a collective forward, FSDP2's, would hang otherwise). Said once per split, with the sizes that avoid it."""
        trainer = getattr(self, "trainer", None)
        world = getattr(trainer, "world_size", 1) if trainer is not None else 1
        n = len(self.examples[split])
        if world > 1 and n % world and split not in self._warned:
            self._warned.add(split)
            log.warning("%s split: %d rows over %d processes: Lightning repeats %d of them to even the processes out, "
                        "and %s metrics count those twice; give the split a multiple of %d rows (data.source.n_%s)",
                        split, n, world, world - n % world, split, world, split)

    def _loader_kw(self) -> dict:
        return dict(collate_fn=self.collate, num_workers=self.num_workers, persistent_workers=self.num_workers > 0)

    def transfer_batch_to_device(self, batch, device, dataloader_idx: int):
        """Our batches are flat dicts of tensors and lists of strings: move the tensors, leave the strings
        (Lightning's generic walk visits every string, about 5% of a small DPO step)."""
        flat = isinstance(batch, dict) and all(
            torch.is_tensor(v) or (isinstance(v, list) and not any(torch.is_tensor(x) for x in v)) for v in batch.values()
        )
        if flat:
            return {k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()}
        return super().transfer_batch_to_device(batch, device, dataloader_idx)
