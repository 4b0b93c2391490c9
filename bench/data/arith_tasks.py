"""Multi-step arithmetic for bench/arith.py: problems, clean solutions, and checkers for each step and the answer.

A problem: "Start with 7. Add 5. Multiply by 2. Subtract 3." A solution works it one step a line,
then gives the answer:

    7 + 5 = 12
    12 * 2 = 24
    24 - 3 = 21
    Answer: 21

The checkers read the problem back from the prompt text, so they need no other column:
`right_answer` (align label-steps --answer-fn, and a reward for eval) and `right_steps`
(--step-fn: a step is right when it applies the problem's next operation to the value the solution
has reached and gets its result, so a mistake carried on correctly is the one wrong step).
`on_track_labels` instead marks every step after a first error wrong too, as Math-Shepherd's
rollouts would find.
"""

from __future__ import annotations

import random
import re

INSTRUCTION = "{problem} What is the result? Work it out one step a line, then give the answer."
OPS = {"Add": "+", "Subtract": "-", "Multiply by": "*"}
_STEP = re.compile(r"^\s*(-?\d+)\s*([+\-*])\s*(-?\d+)\s*=\s*(-?\d+)\s*$")
_ANSWER = re.compile(r"^\s*Answer:\s*(-?\d+)\s*\.?\s*$")
_OPERATION = re.compile(r"(Add|Subtract|Multiply by) (\d+)\.")


def problem(rng: random.Random, operations: int) -> tuple[str, list[tuple[str, int]], int]:
    """A problem's text, its operations and its start: values stay between 0 and 99."""
    while True:
        start = rng.randint(2, 20)
        ops, value = [], start
        for _ in range(operations):
            name = rng.choice(list(OPS))
            operand = rng.randint(2, 3) if name == "Multiply by" else rng.randint(1, 9)
            ops.append((name, operand))
            value = apply(value, OPS[name], operand)
        if all(0 <= v <= 99 for v in values(start, ops)):
            text = f"Start with {start}. " + " ".join(f"{name} {operand}." for name, operand in ops)
            return text, ops, start


def apply(value: int, op: str, operand: int) -> int:
    return value + operand if op == "+" else value - operand if op == "-" else value * operand


def values(start: int, ops: list[tuple[str, int]]) -> list[int]:
    """The true value after each operation."""
    out, value = [], start
    for name, operand in ops:
        value = apply(value, OPS[name], operand)
        out.append(value)
    return out


def solution_steps(start: int, ops: list[tuple[str, int]], wrong_at: int | None = None, off: int = 0) -> list[str]:
    """A solution's steps; with wrong_at, that step's result is off by `off` and the steps after it
    carry the wrong value on correctly (so exactly one step is wrong, and every later one)."""
    steps, value = [], start
    for k, (name, operand) in enumerate(ops):
        result = apply(value, OPS[name], operand) + (off if k == wrong_at else 0)
        steps.append(f"{value} {OPS[name]} {operand} = {result}")
        value = result
    return steps + [f"Answer: {value}"]


def parse(prompt) -> tuple[int, list[tuple[str, int]]]:
    text = prompt if isinstance(prompt, str) else prompt[-1]["content"]
    start = int(re.search(r"Start with (\d+)\.", text).group(1))
    return start, [(name, int(operand)) for name, operand in _OPERATION.findall(text)]


def final_answer(solution: str) -> int | None:
    """The number on the solution's last non-empty line when it reads 'Answer: N'."""
    lines = [line for line in solution.splitlines() if line.strip()]
    match = _ANSWER.match(lines[-1]) if lines else None
    return int(match.group(1)) if match else None


def final_answers(prompts, completions) -> list[int | None]:
    """final_answer of each solution: a vote function for `align best-of-n --vote`."""
    return [final_answer(completion) for completion in completions]


def right_answer(prompts, completions) -> list[bool]:
    """Does each completed solution end with the right answer?"""
    out = []
    for prompt, completion in zip(prompts, completions):
        start, ops = parse(prompt)
        out.append(final_answer(completion) == values(start, ops)[-1])
    return out


def answer_reward(prompts, completions) -> list[float]:
    """right_answer as a reward (1.0 or 0.0), for align eval."""
    return [float(ok) for ok in right_answer(prompts, completions)]


def step_labels(prompt, steps: list[str]) -> list[bool]:
    """Exact labels, each step judged on its own: step k is right when it applies the problem's k-th
    operation to the value the solution has reached (the start, or step k-1's result) and gets its result;
    the answer step when it states the value reached after the last operation; a step past it is wrong, and
    so is every step after one that cannot be read. A solution's steps are all right exactly when its
    answer is, and a mistake carried on correctly is its only wrong step (PRM800K's judgement of a step
    given the steps before it)."""
    return _judged(prompt, steps, carried=True)


def on_track_labels(prompt, steps: list[str]) -> list[bool]:
    """Is the solution still on its way to the right answer after each step: step k is right when it is
    the problem's k-th operation on the true value with the true result, so every step after a first
    error is wrong too. What Math-Shepherd's rollouts estimate."""
    return _judged(prompt, steps, carried=False)


def _judged(prompt, steps: list[str], carried: bool) -> list[bool]:
    """Each step against the value it should start from: the solution's own last result (`carried`; None
    once a step cannot be read) or the true one."""
    start, ops = parse(prompt)
    labels, value = [], start
    for k, step in enumerate(steps):
        if k < len(ops):
            name, operand = ops[k]
            match = _STEP.match(step) if value is not None else None
            result = apply(value, OPS[name], operand) if value is not None else None
            labels.append(bool(match) and (int(match.group(1)), match.group(2), int(match.group(3)), int(match.group(4)))
                          == (value, OPS[name], operand, result))
            value = (int(match.group(4)) if match else None) if carried else result
        else:
            match = _ANSWER.match(step) if k == len(ops) and value is not None else None
            labels.append(bool(match) and int(match.group(1)) == value)
    return labels


def right_steps(prompts, steps) -> list[list[bool]]:
    return [step_labels(prompt, solution) for prompt, solution in zip(prompts, steps)]
