"""A calculator, as an environment on TRL's contract (src/envs/tools.py): the tool for arithmetic whose operands are
too large for a small policy to add or multiply by itself.

    env = Environment(Calculator())
    env.reset(prompt="123456*789=", answer="97406784")
    env.call(ToolCall("calculate", {"expression": "123456*789"}))  # -> ToolResult("97406784")

It evaluates integer expressions of + - * and parentheses only (Python's `ast`, never `eval`): anything else comes
back as an error message to the policy. The verifier scores the episode's final answer (no `get_reward`).
"""

from __future__ import annotations

import ast
import operator

from genlight.envs.tools import tool_schema

OPS = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul}
MAX_DIGITS = 40  # a result longer than this is refused (a policy that multiplies forever never stalls the run)


def evaluate(expression: str) -> int:
    """The value of an integer expression of + - * and parentheses; ValueError naming what is not allowed."""
    try:
        tree = ast.parse(expression.strip(), mode="eval")
    except SyntaxError:
        raise ValueError(f"not an arithmetic expression: {expression!r}") from None

    def walk(node) -> int:
        if isinstance(node, ast.Expression):
            return walk(node.body)
        if isinstance(node, ast.Constant) and type(node.value) is int:
            return node.value
        if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub | ast.UAdd):
            v = walk(node.operand)
            return -v if isinstance(node.op, ast.USub) else v
        if isinstance(node, ast.BinOp) and type(node.op) in OPS:
            v = OPS[type(node.op)](walk(node.left), walk(node.right))
            if len(str(abs(v))) > MAX_DIGITS:
                raise ValueError(f"the result has more than {MAX_DIGITS} digits")
            return v
        raise ValueError(f"only integers, + - * and parentheses are allowed, not {ast.unparse(node)!r}")

    return walk(tree)


class Calculator:
    """An arithmetic environment whose one tool is a calculator (TRL's `environment_factory` contract)."""

    def __init__(self):
        self.calls = 0

    def reset(self, **row) -> None:
        self.calls = 0

    def calculate(self, expression: str) -> str:
        """Evaluate an arithmetic expression of integers with +, - and *.

        Args:
            expression: the expression, for example "123456*789" or "(12+30)*2"
        """
        self.calls += 1
        return str(evaluate(expression))


class CalculatorTask:
    """The arithmetic task (src/datamodules/arithmetic.py) as chat prompts, for RL with the calculator: `123*456=` ->
    56088, with operands too large for a small policy to multiply by itself. `sft_rows` are the warm start's
    demonstrations: with `tool_demos`, two rows per problem (the turn that calls the calculator, and the answer after
    its result: the policy learns to call it and to copy what it returns); without, the answer alone (the no-tool
    baseline's warm start)."""

    def __init__(self, digits: int = 3, ops: tuple[str, ...] | list[str] = ("*",), n_train: int = 4000,
                 n_val: int = 200, n_test: int = 500, seed: int = 1234, tool_demos: bool = True):
        from genlight.datamodules.arithmetic import ArithmeticTask

        self.task = ArithmeticTask(digits, ops, n_train, n_val, n_test, seed)
        self.tool_demos = tool_demos
        self.schemas = [tool_schema(Calculator().calculate)]

    def rows(self, split: str) -> list[tuple[str, dict]]:
        return [(where.replace("arithmetic", "calculator", 1),
                 {"messages": [{"role": "user", "content": row["prompt"]}], "answer": row["answer"]})
                for where, row in self.task.rows(split)]

    def sft_rows(self, split: str) -> list[tuple[str, dict]]:
        out = []
        for where, row in self.rows(split):
            user, answer = row["messages"], row["answer"]
            if not self.tool_demos:
                out.append((where, {"messages": [*user, {"role": "assistant", "content": answer}]}))
                continue
            expression = user[0]["content"].rstrip("=")
            call = {"role": "assistant", "content": "", "tool_calls": [
                {"type": "function", "function": {"name": "calculate", "arguments": {"expression": expression}}}]}
            result = {"role": "tool", "name": "calculate", "content": str(evaluate(expression))}
            out.append((f"{where}:call", {"messages": [*user, call], "tools": self.schemas}))
            out.append((f"{where}:answer", {"messages": [*user, call, result, {"role": "assistant", "content": answer}],
                                            "tools": self.schemas}))
        return out
