"""Tools and environments for multi-turn RL, on TRL's `environment_factory` contract, so that an environment written
for TRL's `GRPOTrainer` works here unchanged:

  - an environment is a class; one instance per episode (`Environment(factory())`), `reset(**row) -> str | None`
    before it (a string is appended to the prompt's last user message), and an optional `get_reward() -> float`
    read once the episode ends (the environment owns the reward); beyond TRL's contract, an optional `done`
    attribute that turns true when a call ends the episode (a game won or lost: no further turn is sampled);
  - its public methods other than `reset` / `get_reward` are its tools; plain functions are tools too;
  - a tool's JSON schema (what the chat template shows the model) comes from `transformers`' `get_json_schema`, so a
    tool needs a type hint on every argument and a Google-style docstring with an `Args:` entry for each.

A tool call never crashes the run: an unknown tool, bad arguments, a tool that raises or one that runs past its
`timeout` returns an error message to the policy (`ToolResult.error`, counted as `train/tool_errors`). A call that
times out keeps running in its thread (Python cannot stop one): give a tool that may hang its own timeout too.

Calls are parsed in the Hermes / Qwen2.5 convention most chat templates with tool support use:
`<tool_call>{"name": ..., "arguments": {...}}</tool_call>` in the assistant's turn.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import importlib
import inspect
import json
import re
from collections.abc import Callable

SKIP = ("reset", "get_reward", "metrics")  # the environment's own methods (TRL's, and our `metrics`), not tools
TOOL_CALL = re.compile(r"<tool_call>(.*?)</tool_call>", re.DOTALL)


def tool_schema(fn: Callable) -> dict:
    """`fn`'s JSON schema as chat templates take it, or an error naming the tool and what it lacks."""
    from transformers.utils import get_json_schema
    from transformers.utils.chat_template_utils import DocstringParsingException, TypeHintParsingException

    name = getattr(fn, "__qualname__", getattr(fn, "__name__", repr(fn)))
    try:
        return get_json_schema(fn)
    except (TypeHintParsingException, DocstringParsingException) as e:
        raise ValueError(f"tool {name!r}: {e}. A tool needs a type hint on every argument and a docstring with an "
                         "Args: entry for each (transformers' get_json_schema builds the schema the model sees "
                         "from them)") from None


def import_target(path: str, what: str = "environment class"):
    """The object at a dotted `module.Name` path, or an error naming the path and why it does not import."""
    module, _, name = str(path).rpartition(".")
    try:
        return getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError, ValueError) as e:
        raise ValueError(f"{what} {path!r} does not import: {type(e).__name__}: {e}") from None


@dataclasses.dataclass
class ToolCall:
    name: str | None
    arguments: dict
    error: str | None = None  # the call could not be read (malformed JSON, no name): returned to the policy


@dataclasses.dataclass
class ToolResult:
    content: str
    error: bool = False


def parse_tool_calls(text: str) -> list[ToolCall]:
    """The `<tool_call>{json}</tool_call>` blocks of an assistant turn, in order; a block that is not a JSON object
    with a "name" becomes a call carrying its error (the policy reads it and may try again)."""
    calls = []
    for block in TOOL_CALL.findall(text):
        try:
            call = json.loads(block)
        except json.JSONDecodeError as e:
            calls.append(ToolCall(None, {}, f"could not parse the tool call {block.strip()!r}: {e.msg}"))
            continue
        if not isinstance(call, dict) or not isinstance(call.get("name"), str):
            calls.append(ToolCall(None, {}, f"a tool call is {{\"name\": ..., \"arguments\": {{...}}}}, got {block.strip()!r}"))
            continue
        args = call.get("arguments", {})
        if isinstance(args, str):  # some templates serialise the arguments as a JSON string
            try:
                args = json.loads(args)
            except json.JSONDecodeError:
                pass
        if not isinstance(args, dict):
            calls.append(ToolCall(call["name"], {}, f"the arguments of {call['name']!r} must be a JSON object, "
                                                    f"got {args!r}"))
            continue
        calls.append(ToolCall(call["name"], args))
    return calls


class Environment:
    """One episode's tools: an environment instance on TRL's contract and / or plain functions."""

    def __init__(self, instance=None, tools: list[Callable] = (), timeout: float = 10.0):
        if timeout <= 0:
            raise ValueError(f"timeout={timeout}: a tool's time limit must be > 0 seconds")
        self.instance, self.timeout = instance, timeout
        methods = []
        if instance is not None:
            cls = type(instance)
            if not callable(getattr(instance, "reset", None)):
                raise ValueError(f"environment {cls.__module__}.{cls.__qualname__} has no reset(**row) method "
                                 "(TRL's environment_factory contract)")
            # listed on the class, as TRL does: listing the instance would evaluate its properties
            methods = [getattr(instance, n) for n, _ in inspect.getmembers(cls, inspect.isfunction)
                       if not n.startswith("_") and n not in SKIP]
        self.tools: dict[str, Callable] = {}
        for fn in [*methods, *tools]:
            name = fn.__name__
            if name in self.tools:
                raise ValueError(f"two tools are named {name!r}: tool names must be unique")
            self.tools[name] = fn
        self.schemas = [tool_schema(fn) for fn in self.tools.values()]
        self._pool = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="tool")

    def reset(self, **row) -> str | None:
        if self.instance is None:
            return None
        out = self.instance.reset(**row)
        if out is not None and not isinstance(out, str):
            raise ValueError(f"{type(self.instance).__qualname__}.reset returned {type(out).__name__}: it must return "
                             "a string (appended to the prompt) or None")
        return out

    @property
    def done(self) -> bool:
        """Whether the environment ended the episode (its optional `done` attribute: a game won or lost; TRL's
        contract has none, and an environment without it ends when the policy stops calling tools)."""
        return bool(getattr(self.instance, "done", False))

    def metrics(self) -> dict[str, tuple[float, float]]:
        """The environment's own measurements of its episode (an optional `metrics()` of the instance, beyond TRL's
        contract), each a (numerator, denominator) pair: pooled over episodes and processes as sum / sum, logged as
        `train/env/<name>` and `<val|test>/env/<name>` (a game's hint consistency)."""
        get = getattr(self.instance, "metrics", None)
        if get is None:
            return {}
        out = get()
        for k, v in out.items():
            if not (isinstance(v, tuple) and len(v) == 2 and all(isinstance(x, int | float) for x in v)):
                raise ValueError(f"{type(self.instance).__qualname__}.metrics()[{k!r}] = {v!r}: each value must be a "
                                 "(numerator, denominator) pair of numbers")
        return {k: (float(a), float(b)) for k, (a, b) in out.items()}

    def reward(self) -> float | None:
        """`get_reward()` when the environment owns its reward, else None (the verifier scores the episode)."""
        get = getattr(self.instance, "get_reward", None)
        if get is None:
            return None
        r = get()
        if isinstance(r, bool) or not isinstance(r, int | float):
            raise ValueError(f"{type(self.instance).__qualname__}.get_reward returned {r!r}: it must return a float")
        return float(r)

    def call(self, call: ToolCall) -> ToolResult:
        """Run one parsed call; every failure comes back as an error message for the policy, never an exception."""
        if call.error:
            return ToolResult(f"Error: {call.error}", error=True)
        fn = self.tools.get(call.name)
        if fn is None:
            return ToolResult(f"Error: unknown tool {call.name!r}; the tools are: {', '.join(self.tools) or 'none'}",
                              error=True)
        try:
            inspect.signature(fn).bind(**call.arguments)
        except TypeError as e:
            return ToolResult(f"Error: {call.name}: {e}", error=True)
        future = self._pool.submit(fn, **call.arguments)
        try:
            out = future.result(timeout=self.timeout)
        except concurrent.futures.TimeoutError:
            # the hung call keeps this pool's thread: later calls get a fresh one
            self._pool.shutdown(wait=False, cancel_futures=True)
            self._pool = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="tool")
            return ToolResult(f"Error: {call.name} did not finish in {self.timeout:g} s", error=True)
        except Exception as e:  # noqa: BLE001 - the policy reads what went wrong
            return ToolResult(f"Error: {call.name} raised {type(e).__name__}: {e}", error=True)
        return ToolResult(out if isinstance(out, str) else json.dumps(out, default=str))

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)


def check_tool_template(tokenizer, where: str = "model.tokenizer") -> None:
    """Stop before work when the chat template cannot show a tool-calling conversation (user -> assistant with a
    tool call -> tool): the policy would never see its tools or their results."""
    probe = [
        {"role": "user", "content": "q_sentinel"},
        {"role": "assistant", "content": "", "tool_calls": [
            {"type": "function", "function": {"name": "name_sentinel", "arguments": {"arg_sentinel": 1}}}]},
        {"role": "tool", "name": "name_sentinel", "content": "result_sentinel"},
    ]
    ok = tokenizer.chat_template is not None
    if ok:
        try:
            text = tokenizer.apply_chat_template(probe, tokenize=False)
        except Exception:  # noqa: BLE001 - a template that cannot render it has no tool support
            ok = False
        else:
            ok = all(s in text for s in ("name_sentinel", "arg_sentinel", "result_sentinel"))
    if not ok:
        raise ValueError(f"{where}: the chat template has no tool support (it cannot show a tool call and its result); "
                         "give the tokenizer one that renders `tool_calls` and `tool` messages (e.g. Qwen2.5's), "
                         "as tokenizer.chat_template or in the checkpoint's tokenizer_config.json")


class EnvSpec:
    """A multi-turn run's environment (`env=`, conf/env/): `environment` makes one environment instance per episode (a
    class on TRL's contract, as Hydra's partial) and/or `tools` (plain functions, or their import paths), with the
    episode's limits: `max_turns` assistant turns, `max_tokens` completion tokens in all (the policy's and the tool
    turns'), `timeout` seconds per tool call. Everything is checked here, before any work."""

    def __init__(self, environment: Callable | None = None, tools: list = (), max_turns: int = 3,
                 max_tokens: int = 256, timeout: float = 10.0):
        if max_turns < 1:
            raise ValueError(f"env.max_turns={max_turns}: an episode has at least one turn")
        if max_tokens < 1:
            raise ValueError(f"env.max_tokens={max_tokens}: an episode's token budget must be >= 1")
        if environment is None and not tools:
            raise ValueError("env: give an environment class (env.environment._target_) or tools (env.tools=[...])")
        self.environment = environment
        self.tools = [import_target(t, "tool") if isinstance(t, str) else t for t in tools]
        self.max_turns, self.max_tokens, self.timeout = max_turns, max_tokens, timeout
        self.schemas = self.make().schemas  # a tool without hints or docstring stops here, naming it

    def make(self) -> Environment:
        return Environment(self.environment() if self.environment is not None else None, self.tools, self.timeout)
