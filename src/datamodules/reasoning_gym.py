"""reasoning-gym's procedurally generated tasks (Apache-2.0; no download) as a data source, and its scorers as a
verifier.

`data=reasoning_gym data.source.tasks=[chain_sum, {name: gcd, weight: 2, config: {max_value: 99}}]` mixes
generators by weight (a task may also name a curriculum `level`: reasoning-gym's own difficulty ladder). Each task's
entries are generated with one seed and cut into disjoint train / val / test splits (a question is in one split
only). A row is the question as its prompt, the generator's answer as its completion (SFT warm start) and, as
its `answer`, a `Reference`: the answer text carrying the generator's entry, which the verifier
(`reward=reasoning_gym`) needs: a scorer reads the entry's metadata, not only the answer string. The entry travels
in the batch with its row, so every process (DDP) scores its own rows.

The verifier calls the generator's own `score_answer(answer, entry)`:
  - partial credit: many scorers pay a little for a wrong answer (string similarity, a format bonus of 0.01).
    `reward.partial_credit=false` (the default) pays 1 for full credit and 0 otherwise; true passes the score on.
  - a score that is not a number in [0, 1] stops the run, naming the task; a scorer that raises on a completion
    (a malformed answer it cannot parse) scores it 0, once logged per task.
  - before training (`check_references`) it probes each task's scorer with junk answers (empty, "0", "1", "yes",
    "no", "0123456789", the question itself) on a sample of entries: a task that pays junk that is not the entry's answer stops the
    run, naming the task and the junk: a reward hole the policy would learn to exploit.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import random

from genlight.datamodules.files import DataError
from genlight.rewards import Verifier

log = logging.getLogger(__name__)
# and each entry's own question; the digits catch a scorer that pays any answer containing the right one (the
# default scorer's partial credit len(answer) / len(completion))
JUNK = ("", "0", "1", "yes", "no", "0123456789")
PROBE_ENTRIES = 16


class Reference(str):
    """An answer text that carries its reasoning-gym entry and the task (name, config as JSON, curriculum level) whose
    generator scores it."""

    def __new__(cls, text: str, entry: dict, task: tuple[str, str, int | None]):
        ref = super().__new__(cls, text)
        ref.entry, ref.task = entry, task
        return ref

    def __reduce__(self):  # dataloader workers and spawned processes get the entry too
        return Reference, (str(self), self.entry, self.task)


def task_specs(tasks) -> list[dict]:
    """`data.source.tasks` as [{name, weight, config, level}], checked against reasoning-gym's registry."""
    from omegaconf import OmegaConf
    from reasoning_gym.factory import DATASETS, has_curriculum

    if OmegaConf.is_config(tasks):  # from Hydra: plain lists and dicts (a generator's options become JSON)
        tasks = OmegaConf.to_container(tasks, resolve=True)
    specs = []
    for i, t in enumerate([tasks] if isinstance(tasks, str | dict) else list(tasks or [])):
        spec = {"name": t} if isinstance(t, str) else dict(t)
        unknown = set(spec) - {"name", "weight", "config", "level"}
        if "name" not in spec or unknown:
            raise ValueError(f"data.source.tasks[{i}]={t!r}: a task is a generator name or {{name, weight, config, "
                             f"level}}" + (f" (unknown keys {sorted(unknown)})" if unknown else ""))
        name = spec["name"]
        if name not in DATASETS:
            raise ValueError(f"data.source.tasks[{i}]: unknown reasoning-gym task {name!r}; the available ones: "
                             f"{', '.join(sorted(DATASETS))}")
        weight = spec.get("weight", 1.0)
        if not isinstance(weight, int | float) or weight <= 0:
            raise ValueError(f"data.source.tasks[{i}].weight={weight!r}: must be a number > 0")
        if spec.get("level") is not None and not has_curriculum(name):
            raise ValueError(f"data.source.tasks[{i}].level: reasoning-gym has no curriculum for {name!r}")
        specs.append({"name": name, "weight": float(weight), "config": dict(spec.get("config") or {}),
                      "level": spec.get("level")})
    if not specs:
        raise ValueError("data.source.tasks is empty: name at least one reasoning-gym task")
    return specs


def make_dataset(name: str, config: dict, level: int | None, size: int, seed: int):
    """The generator `name` with `config` (over the curriculum `level`'s settings, when given)."""
    import reasoning_gym
    from reasoning_gym.factory import DATASETS, create_curriculum

    settings = {}
    if level is not None:
        curriculum = create_curriculum(name)
        curriculum.set_global_level(level)
        made = curriculum.generate_configuration()
        settings = {f.name: getattr(made, f.name) for f in dataclasses.fields(made)}
    fields = {f.name for f in dataclasses.fields(DATASETS[name][1])}
    bad = set(config) - fields
    if bad:
        raise ValueError(f"data.source.tasks: {name} has no option(s) {sorted(bad)}; its options: "
                         f"{sorted(fields - {'seed', 'size'})}")
    return reasoning_gym.create_dataset(name, **(settings | config | {"size": size, "seed": seed}))


class ReasoningGymTask:
    """Disjoint, seeded train / val / test rows from reasoning-gym generators mixed by weight."""

    def __init__(self, tasks, n_train: int = 2000, n_val: int = 200, n_test: int = 200, seed: int = 1234):
        self.specs = task_specs(tasks)
        self.n = {"train": n_train, "val": n_val, "test": n_test}
        if min(self.n.values()) < 0 or n_train < 1:
            raise ValueError(f"data.source.n_train/n_val/n_test={list(self.n.values())}: n_train >= 1, the others >= 0")
        self.seed = seed
        self.splits: dict[str, list[tuple[str, dict]]] = {s: [] for s in self.n}
        for k, spec in enumerate(self.specs):
            share = {s: self._share(n, k) for s, n in self.n.items()}
            self._generate(spec, share)
        for split, rows in self.splits.items():  # tasks interleaved, seeded
            random.Random(f"{seed}-{split}").shuffle(rows)

    def _share(self, n: int, k: int) -> int:
        """Task k's count of a split of n rows: largest-remainder rounding, so the split has exactly n."""
        total = sum(s["weight"] for s in self.specs)
        exact = [n * s["weight"] / total for s in self.specs]
        floors = [math.floor(x) for x in exact]
        order = sorted(range(len(exact)), key=lambda i: floors[i] - exact[i])
        return floors[k] + (k in order[: n - sum(floors)])

    def _generate(self, spec: dict, share: dict[str, int]) -> None:
        name, config = spec["name"], spec["config"]
        need = sum(share.values())
        key = (name, json.dumps(config, sort_keys=True), spec["level"])  # what builds its scorer
        # draw more than needed and keep the first occurrence of each question: a small problem space repeats
        size = 4 * need + 64
        ds = make_dataset(name, config, spec["level"], size, self.seed)
        seen, entries = set(), []
        for i in range(size):
            entry = ds[i]
            if entry["question"] not in seen:
                seen.add(entry["question"])
                entries.append(entry)
            if len(entries) == need:
                break
        if len(entries) < need:
            raise ValueError(f"data.source.tasks: {name} {config or ''} has only {len(entries)} distinct questions in "
                             f"{size} draws, fewer than the {need} its splits need: lower n_train / n_val / n_test, "
                             "or widen its config")
        start = 0
        for split, n in share.items():
            for i, entry in enumerate(entries[start : start + n]):
                ref = Reference(str(entry["answer"]), entry, key)
                self.splits[split].append((f"reasoning_gym:{name}:{split}:{i}", {
                    "prompt": entry["question"], "completion": str(entry["answer"]), "answer": ref}))
            start += n

    def rows(self, split: str) -> list[tuple[str, dict]]:
        return list(self.splits[split])

    def preference_rows(self, split: str, seed: int = 0) -> list[tuple[str, dict]]:
        raise DataError("data=reasoning_gym makes SFT rows and RL prompts; its generators give no rejected answer to "
                        "pair with (a corrupted answer may still be right, or trivially wrong): use algo=sft or "
                        "algo=rlvr, or write pairs to a file (data=jsonl_pref)")


class ReasoningGymScore(Verifier):
    """A reasoning-gym generator's own `score_answer` on its own entry (see the module docstring)."""

    name = "reasoning_gym"

    def __init__(self, partial_credit: bool = False, answer_tag: str | None = None):
        self.partial_credit, self.answer_tag = partial_credit, answer_tag
        self._scorers: dict = {}
        self._warned: set = set()

    def scorer(self, ref: Reference):
        if ref.task not in self._scorers:  # the generator with the task's own settings: a scorer may read them
            name, config, level = ref.task
            self._scorers[ref.task] = make_dataset(name, json.loads(config), level, 1, 0).score_answer
        return self._scorers[ref.task]

    def extract(self, completion: str) -> str | None:
        if not isinstance(completion, str):
            return None
        if self.answer_tag:
            from reasoning_gym.utils import extract_answer

            completion = extract_answer(completion, tag_name=self.answer_tag) or ""
        text = completion.strip()
        return text or None

    def raw_score(self, answer: str | None, ref: Reference) -> float:
        name = ref.task[0]
        try:
            s = self.scorer(ref)(answer, ref.entry)
        except Exception as e:  # noqa: BLE001 - a scorer that cannot parse a malformed answer
            if name not in self._warned:
                self._warned.add(name)
                log.warning("reasoning-gym %s: score_answer raised %s: %s on %r; scored 0 (logged once per task)",
                            name, type(e).__name__, e, answer)
            return 0.0
        if not isinstance(s, int | float) or not 0.0 <= s <= 1.0:  # a bool is 0 or 1; NaN fails the range
            raise ValueError(f"reasoning-gym {name}: score_answer returned {s!r} for {answer!r}: a score must be a "
                             "number in [0, 1]")
        return float(s)

    def __call__(self, completion: str, answer: str) -> float:
        if not isinstance(answer, Reference):
            raise ValueError("reward=reasoning_gym scores with the generator's entry, which only data=reasoning_gym's "
                             "rows carry; with other data use reward=exact / math_verify")
        s = self.raw_score(self.extract(completion), answer)
        return s if self.partial_credit else float(s >= 1.0)

    def check_references(self, examples: list[dict], split: str) -> None:
        """The junk probe, on up to PROBE_ENTRIES entries of each task of the train split."""
        if split != "train":
            return
        by_task: dict = {}
        for e in examples:
            ref = e["reference"]
            if not isinstance(ref, Reference):
                raise ValueError(f"{e['where']}: reward=reasoning_gym needs data=reasoning_gym's rows")
            by_task.setdefault(ref.task, []).append(e)
        for task, rows in by_task.items():
            for e in rows[:PROBE_ENTRIES]:
                ref = e["reference"]
                for junk in (*JUNK, ref.entry["question"]):
                    if junk.strip() == str(ref).strip():
                        continue  # the right answer is not junk
                    credit = self(junk, ref)
                    if credit > 0:
                        raise ValueError(
                            f"reasoning-gym task {task[0]!r} pays {credit:g} to the junk answer {junk[:60]!r} "
                            f"({e['where']}, answer {str(ref)!r}): a reward hole the policy would learn to exploit; "
                            "drop the task from data.source.tasks" + ("" if not self.partial_credit else
                                                                       ", or set reward.partial_credit=false"))
