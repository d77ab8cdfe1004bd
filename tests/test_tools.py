"""The tool and environment contract of multi-turn RL (src/envs/tools.py): an environment written for TRL's
`environment_factory` works unchanged, schemas come from transformers, a tool call never crashes the run, and bad
tools, environments and templates stop before work."""

from __future__ import annotations

import threading
import time

import pytest

from genlight.envs.tools import (
    Environment,
    ToolCall,
    check_tool_template,
    import_target,
    parse_tool_calls,
    tool_schema,
)


class Counter:
    """Written against TRL's contract only: reset(**row), public typed methods as tools, get_reward()."""

    def __init__(self):
        self.total, self.target = 0, None

    def reset(self, **row) -> str | None:
        self.total, self.target = 0, int(row["target"])
        return f"Reach {self.target}."

    def add(self, n: int) -> str:
        """Add n to the running total.

        Args:
            n: how much to add
        """
        self.total += n
        return str(self.total)

    def get_reward(self) -> float:
        return float(self.total == self.target)

    def _helper(self) -> None:  # private: not a tool
        raise AssertionError

    @property
    def state(self) -> int:  # a property is never evaluated while the tools are listed
        raise AssertionError("listing the tools evaluated a property")


def multiply(a: int, b: int) -> int:
    """Multiply two integers.

    Args:
        a: the first factor
        b: the second factor
    """
    return a * b


def test_an_environment_on_trls_contract_runs_unchanged():
    env = Environment(Counter(), tools=[multiply])
    assert list(env.tools) == ["add", "multiply"]
    schema = {s["function"]["name"]: s["function"] for s in env.schemas}
    assert schema["add"]["parameters"]["properties"]["n"] == {"type": "integer", "description": "how much to add"}
    assert schema["multiply"]["parameters"]["required"] == ["a", "b"]
    assert env.reset(target=7, prompt="ignored") == "Reach 7."
    assert env.reward() == 0.0
    for call in parse_tool_calls('<tool_call>{"name": "add", "arguments": {"n": 3}}</tool_call> and '
                                 '<tool_call>{"name": "add", "arguments": "{\\"n\\": 4}"}</tool_call>'):
        assert not env.call(call).error
    assert env.instance.total == 7 and env.reward() == 1.0
    assert env.call(ToolCall("multiply", {"a": 6, "b": 7})).content == "42"
    assert Environment(tools=[multiply]).reward() is None  # no environment: the verifier scores the episode


def test_every_failing_call_comes_back_as_an_error_message():
    def boom(x: str) -> str:
        """Fail.

        Args:
            x: anything
        """
        raise RuntimeError("disk on fire")

    release = threading.Event()

    def hang(x: str) -> str:
        """Hang.

        Args:
            x: anything
        """
        release.wait(5)
        return "late"

    env = Environment(Counter(), tools=[boom, hang], timeout=0.2)
    env.reset(target=1)
    results = {
        "raises": env.call(ToolCall("boom", {"x": "a"})),
        "unknown": env.call(ToolCall("rm", {})),
        "bad args": env.call(ToolCall("add", {"m": 1})),
        "malformed": env.call(parse_tool_calls("<tool_call>{name: add}</tool_call>")[0]),
        "no name": env.call(parse_tool_calls('<tool_call>{"arguments": {}}</tool_call>')[0]),
    }
    t = time.monotonic()
    results["hangs"] = env.call(ToolCall("hang", {"x": "a"}))
    assert time.monotonic() - t < 2
    release.set()
    assert all(r.error for r in results.values())
    assert "RuntimeError: disk on fire" in results["raises"].content
    assert "unknown tool 'rm'; the tools are: add, boom, hang" in results["unknown"].content
    assert "missing a required argument: 'n'" in results["bad args"].content
    assert "could not parse the tool call" in results["malformed"].content
    assert "did not finish in 0.2 s" in results["hangs"].content
    assert env.call(ToolCall("add", {"n": 1})).content == "1"  # a fresh thread after the hung one


def test_bad_tools_environments_and_templates_stop_naming_the_fault(tokenizer):
    def untyped(a):
        """No types.

        Args:
            a: a
        """

    def undocumented(a: int):
        pass

    with pytest.raises(ValueError, match=r"tool '.*untyped'.*missing a type hint"):
        tool_schema(untyped)
    with pytest.raises(ValueError, match=r"tool '.*undocumented'.*no docstring"):
        Environment(tools=[undocumented])
    with pytest.raises(ValueError, match=r"environment class 'tests.nowhere.Env' does not import: ModuleNotFoundError"):
        import_target("tests.nowhere.Env")
    with pytest.raises(ValueError, match=r"environment class 'tests.test_tools.Nope' does not import: AttributeError"):
        import_target("tests.test_tools.Nope")
    assert import_target("tests.test_tools.Counter") is Counter

    class NoReset:
        pass

    with pytest.raises(ValueError, match=r"NoReset has no reset\(\*\*row\) method"):
        Environment(NoReset())
    # a template that shows no tool calls is refused, saying how to give one; the embedded default's shows them
    from tests.test_multiturn import toolless_tokenizer

    with pytest.raises(ValueError, match="model.tokenizer: the chat template has no tool support"):
        check_tool_template(toolless_tokenizer())
    check_tool_template(tokenizer)


def test_a_template_with_tool_support_passes_the_check(tokenizer):
    import copy

    tok = copy.deepcopy(tokenizer)
    tok.chat_template = (
        "{% for m in messages %}<|{{ m.role }}|>{{ m.content }}"
        "{% for c in m.tool_calls or [] %}<tool_call>{{ {'name': c.function.name, 'arguments': c.function.arguments}"
        " | tojson }}</tool_call>{% endfor %}\n{% endfor %}")
    check_tool_template(tok)


def test_the_calculator_environment_computes_and_refuses_what_is_not_arithmetic():
    from genlight.envs.calculator import Calculator

    env = Environment(Calculator())
    assert [s["function"]["name"] for s in env.schemas] == ["calculate"]
    assert env.reset(prompt="123456*789=", answer="97406784") is None
    ok = env.call(parse_tool_calls('<tool_call>{"name": "calculate", "arguments": {"expression": "123456*789"}}'
                                   '</tool_call>')[0])
    assert ok.content == "97406784" and not ok.error
    assert env.call(ToolCall("calculate", {"expression": "-(12+30)*2 - 1"})).content == "-85"
    for bad, message in [("__import__('os').system('x')", "only integers, + - * and parentheses are allowed"),
                         ("2**100000", "only integers"), ("7/2", "only integers"), ("1.5+1", "only integers"),
                         ("12+", "not an arithmetic expression"), ("9" * 30 + "*" + "9" * 30, "more than 40 digits")]:
        res = env.call(ToolCall("calculate", {"expression": bad}))
        assert res.error and message in res.content, (bad, res.content)
    assert env.instance.calls == 8
