"""align label-steps: Math-Shepherd step labels from rollouts (hard and soft), a step function
instead, the prompt file's columns passed to the checker, resume after a kill, and bad input."""

from __future__ import annotations

import json

import pytest

from conftest import assert_clean_failure, interrupt_on_call, write_jsonl

CHECKERS = """
def even_e(prompts, completions):
    return [c.count("e") % 2 == 0 for c in completions]

def contains_answer(prompts, completions, answer):
    return [a in c for a, c in zip(answer, completions)]

def all_columns(prompts, completions, **columns):
    return [columns["answer"][i] == "x" for i in range(len(completions))]

def odd_steps(prompts, steps):
    return [[len(step) % 2 == 1 for step in solution] for solution in steps]

def raises_on_row_3(prompts, completions):
    if any("problem 2" in p for p in prompts):
        raise ValueError("cannot parse")
    return [True] * len(completions)

def a_number(prompts, completions):
    return [0.5] * len(completions)

def too_few_labels(prompts, steps):
    return [[True] for _ in steps]
"""
SEP = " "  # the tiny model's random text has few newlines and many spaces: several steps per solution


@pytest.fixture
def problems(tmp_path):
    return write_jsonl(tmp_path / "problems.jsonl", [{"prompt": f"Solve problem {i}.", "answer": "e"} for i in range(4)])


@pytest.fixture
def checkers(tmp_path):
    path = tmp_path / "checkers.py"
    path.write_text(CHECKERS)
    return path


def label_steps(align, problems, out, *extra):
    return align("label-steps", "--policy", "tiny", "-p", problems, "-o", out, "-n", "2", "--rollouts", "3",
                 "--max-new-tokens", "8", "--batch-size", "4", "--step-separator", SEP, *extra)


def read_rows(path):
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


@pytest.fixture
def recorded(monkeypatch):
    """Every (prompt, completion, verdict) the answer function was asked about."""
    from align.stages import label_steps as stage

    calls, answers = [], stage.Checker.answers

    def recording(self, rows, completions, numbers):
        verdicts = answers(self, rows, completions, numbers)
        calls.extend(zip([r["prompt"] for r in rows], completions, verdicts))
        return verdicts

    monkeypatch.setattr(stage.Checker, "answers", recording)
    return calls


@pytest.mark.parametrize("kind", ["hard", "soft"])
def test_each_step_is_labelled_by_the_rollouts_from_it(align, problems, checkers, tmp_path, recorded, kind):
    out = tmp_path / "steps.jsonl"
    result = label_steps(align, problems, out, "--answer-fn", f"{checkers}:even_e", "--labels", kind)
    assert result.code == 0, result.err
    rows = read_rows(out)
    assert rows and sum(len(r["completions"]) for r in rows) > len(rows)  # solutions of several steps
    for row in rows:
        steps = row["completions"]
        assert len(row["labels"]) == len(steps) == len(row["reached"])
        # The last step's label is the solution's own check, made on the whole solution.
        assert row["correct"] == (SEP.join(steps).count("e") % 2 == 0) and row["labels"][-1] == float(row["correct"])
        for k in range(len(steps) - 1):
            prefix = SEP.join(steps[:k + 1]) + SEP
            rollouts = [ok for prompt, text, ok in recorded if prompt == row["prompt"] and text.startswith(prefix)
                        and text != SEP.join(steps)]
            assert len(rollouts) >= 3  # this step's rollouts (another solution may share the prefix)
            reached = row["reached"][k]
            assert reached == sum(rollouts) if len(rollouts) == 3 else 0 <= reached <= 3
            assert row["labels"][k] == (reached / 3 if kind == "soft" else reached > 0)
        assert row["reached"][-1] is None
    metrics = json.loads(out.with_name(out.name + ".align.json").read_text())["metrics"]
    assert metrics["solutions"] == len(rows) and metrics["steps"] == sum(len(r["completions"]) for r in rows)
    assert metrics["rollouts"] == 3 * (metrics["steps"] - metrics["solutions"])
    assert metrics["solutions_correct"] == pytest.approx(sum(r["correct"] for r in rows) / len(rows))


def test_the_output_trains_a_prm(align, problems, checkers, tmp_path):
    out = tmp_path / "steps.jsonl"
    assert label_steps(align, problems, out, "--answer-fn", f"{checkers}:contains_answer", "--labels", "soft").code == 0
    result = align("prm", "-m", "tiny", "-d", out, "-o", tmp_path / "prm", "--step-separator", SEP, "--max-steps", "2",
                   "--batch-size", "4")
    assert result.code == 0, result.err
    assert json.loads((tmp_path / "prm" / "align.json").read_text())["step_separator"] == SEP


def test_the_prompt_files_columns_reach_the_answer_function(align, tmp_path, checkers):
    problems = write_jsonl(tmp_path / "p.jsonl", [{"prompt": f"Solve {i}.", "answer": "x" if i % 2 else "y"} for i in range(4)])
    out = tmp_path / "steps.jsonl"
    assert label_steps(align, problems, out, "--answer-fn", f"{checkers}:all_columns").code == 0
    rows = read_rows(out)
    assert rows
    for row in rows:  # every check on an odd problem is true, on an even one false: so are its labels
        odd = int(row["prompt"].split()[1].rstrip(".")) % 2 == 1
        assert row["labels"] == [odd] * len(row["completions"]) and row["correct"] == odd


def test_a_column_named_like_the_functions_arguments_is_not_passed(align, tmp_path, checkers):
    """A stepwise file as the prompts (its `completions` and `labels` columns beside `answer`): the
    function gets the sampled completions, the file's are not passed again as a keyword (that raised
    'got multiple values for argument')."""
    rows = [{"prompt": f"Solve {i}.", "answer": "x" if i % 2 else "y", "completions": ["a", "b"], "labels": [True, False]}
            for i in range(4)]
    problems = write_jsonl(tmp_path / "p.jsonl", rows)
    out = tmp_path / "steps.jsonl"
    result = label_steps(align, problems, out, "--answer-fn", f"{checkers}:all_columns")
    assert result.code == 0, result.err
    for row in read_rows(out):
        assert row["correct"] == (int(row["prompt"].split()[1].rstrip(".")) % 2 == 1)


def test_a_step_function_labels_each_step_without_rollouts(align, problems, checkers, tmp_path):
    out = tmp_path / "steps.jsonl"
    assert label_steps(align, problems, out, "--step-fn", f"{checkers}:odd_steps").code == 0
    rows = read_rows(out)
    assert rows
    for row in rows:
        assert row["labels"] == [len(step) % 2 == 1 for step in row["completions"]] and "reached" not in row
    assert json.loads(out.with_name(out.name + ".align.json").read_text())["metrics"]["rollouts"] == 0


def test_a_killed_run_resumes_to_the_same_file(align, problems, checkers, tmp_path, monkeypatch):
    from align.stages import label_steps as stage

    common = ["--answer-fn", f"{checkers}:even_e"]  # batch 4, 2 samples: two problems per chunk
    straight, killed = tmp_path / "straight.jsonl", tmp_path / "killed.jsonl"
    assert label_steps(align, problems, straight, *common).code == 0
    restore = interrupt_on_call(monkeypatch, stage, "_label_chunk", 2)
    assert label_steps(align, problems, killed, *common).code == 130
    assert not killed.exists() and killed.with_name(killed.name + ".partial").exists()
    restore()
    assert label_steps(align, problems, killed, *common, "--resume").code == 0
    assert read_rows(killed) == read_rows(straight)


@pytest.mark.parametrize("checker, needles", [
    ("--answer-fn=raises_on_row_3", ["answer function", "raised ValueError: cannot parse", "prompt row 3"]),
    ("--answer-fn=a_number", ["answer function", "returned 0.5", "prompt row 1", "true or false"]),
    ("--step-fn=too_few_labels", ["step function", "prompt row 1", "one per step"]),
    ("--answer-fn=no_such_function", ["answer function", "has no function 'no_such_function'"]),
])
def test_a_checker_that_fails_names_the_row(align, problems, checkers, tmp_path, checker, needles):
    option, name = checker.split("=")
    out = tmp_path / "steps.jsonl"
    assert_clean_failure(label_steps(align, problems, out, option, f"{checkers}:{name}"), 2, *needles)
    assert not out.exists()


def test_bad_options_are_refused_before_anything_loads(align, problems, checkers, tmp_path):
    out = tmp_path / "steps.jsonl"
    assert_clean_failure(label_steps(align, problems, out), 2, "--answer-fn", "--step-fn")
    both = ["--answer-fn", f"{checkers}:even_e", "--step-fn", f"{checkers}:odd_steps"]
    assert_clean_failure(label_steps(align, problems, out, *both), 2, "one checker")
    assert_clean_failure(label_steps(align, problems, out, "--answer-fn", f"{checkers}:even_e", "--rollouts", "0"), 2, "rollouts")
    assert not out.exists()


def test_a_reward_model_is_not_a_policy(align, problems, checkers, tmp_path):
    from transformers import AutoModelForTokenClassification

    from align.models import ensure_builtin

    prm = tmp_path / "prm-like"
    AutoModelForTokenClassification.from_pretrained(ensure_builtin("tiny"), num_labels=2).save_pretrained(prm)
    out = tmp_path / "steps.jsonl"
    result = align("label-steps", "--policy", prm, "-p", problems, "-o", out, "--answer-fn", f"{checkers}:even_e")
    assert_clean_failure(result, 4, "TokenClassification", "not a causal language model")
    assert not out.exists()


def test_one_step_solutions_need_no_rollouts(align, problems, checkers, tmp_path):
    """With a separator the tiny model never writes, every solution is one step: labelled by the answer alone."""
    out = tmp_path / "steps.jsonl"
    result = align("label-steps", "--policy", "tiny", "-p", problems, "-o", out, "-n", "2", "--rollouts", "3",
                   "--max-new-tokens", "4", "--step-separator", "\n\n\n", "--answer-fn", f"{checkers}:even_e")
    assert result.code == 0, result.err
    rows = read_rows(out)
    assert rows and all(len(r["completions"]) == 1 and r["labels"] == [r["correct"]] for r in rows)
    assert json.loads(out.with_name(out.name + ".align.json").read_text())["metrics"]["rollouts"] == 0
