"""Step labels without humans (Math-Shepherd): stepwise rows for `align prm` from a policy's own solutions.

For each prompt the policy samples --num-samples solutions, each split into steps on the separator
(exactly as `align prm` and the PRM scorer split them). With --answer-fn, for every step but the
last, --rollouts completions continue the solution from just after that step and the answer
function says which of them reach the right final answer: a hard label is 1 when any does, a soft
label the share that do (Wang et al. 2024, Math-Shepherd). The last step's label is the solution's
own answer check. With --step-fn instead, a function labels every step directly and nothing is
rolled out.

Each output row is a stepwise row: prompt, completions (the steps), labels, and with --answer-fn
the solution's `correct` and each step's `reached` (rollouts that reached the answer).

The user's function is called on a batch: f(prompts, completions, **columns), where columns are
the prompt file's other columns (say `answer`), passed when the function names them or takes
**kwargs; a column named like one of the two arguments it is called with (a stepwise file's
`completions`) is not passed, since the sampled ones go there. Prompts are done in chunks, each
seeded by its first prompt and written as it finishes, so a killed run continues with `--resume`
on the same samples, nothing lost or doubled.
"""

from __future__ import annotations

import inspect
import logging
import time
from collections import Counter
from numbers import Integral, Real
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from align.checkpoints import prepare_output_file, write_manifest
from align.chunked import PartialRows
from align.config import LabelStepsConfig
from align.data import check_separator, prompts_to_sample, split_steps, step_ids
from align.errors import ConfigError
from align.generation import row_seed, sample, sample_ids
from align.engines import open_sampler
from align.models import check_architecture, context_length, load_tokenizer, resolve_model
from align.rewards import call_user, load_function

log = logging.getLogger("align")


def run(config: LabelStepsConfig) -> Path:
    out, started = Path(config.output), time.time()
    checker = Checker(config.answer_fn or config.step_fn, "answer function" if config.answer_fn else "step function")
    source = resolve_model(config.model)
    check_architecture(source, config.model, "causal")  # a reward model given as the policy: refused before anything loads
    tokenizer = load_tokenizer(config.model, source, padding_side="left")
    check_separator(tokenizer, config.step_separator)
    rows, _, chat = prompts_to_sample(config.prompts, tokenizer, config.sampling.seed, context_length(config.model, source),
                                      config.sampling.max_new_tokens, continued="" if config.step_fn else
                                      "a solution, then rollouts from its steps")
    if not config.resume:
        prepare_output_file(out, overwrite=config.overwrite)
    with open_sampler(config.model, source, config.generation, config.sampling.seed) as model:
        outputs = PartialRows({"steps": out}, out.with_name(out.name + ".progress.json"), resume=config.resume)
        if outputs.done:
            log.info("label-steps: resuming after prompt %d of %d", outputs.done, len(rows))

        chunk = max(1, config.sampling.batch_size // config.sampling.num_samples)
        with tqdm(total=len(rows), initial=outputs.done, desc="label-steps", unit="prompt",
                  disable=not log.isEnabledFor(logging.INFO)) as bar:
            for start, end in outputs.fill(len(rows), chunk, lambda start, end: _label_chunk(
                    model, tokenizer, rows[start:end], start, config, chat, checker)):
                bar.update(end - start)
        outputs.finish()

    counts = outputs.counts
    solutions, steps = int(counts.get("solutions", 0)), int(counts.get("steps", 0))
    metrics = {
        "prompts": len(rows), "solutions": solutions, "solutions_without_steps": int(counts.get("no_steps", 0)),
        "steps": steps, "rollouts": int(counts.get("rollouts", 0)),
        "mean_label": counts.get("label_sum", 0.0) / max(1, steps),
        "steps_labelled_correct": counts.get("steps_correct", 0) / max(1, steps),
    }
    if config.answer_fn:
        metrics["solutions_correct"] = counts.get("correct", 0) / max(1, solutions)
    write_manifest(out, config=config, metrics=metrics, started=started, step_separator=config.step_separator)
    log.info("label-steps: %d solutions, %d steps, %.0f%% labelled correct%s", solutions, steps,
             100 * metrics["steps_labelled_correct"],
             f", {100 * metrics['solutions_correct']:.0f}% of solutions right" if config.answer_fn else "")
    return out


def _label_chunk(model, tokenizer, rows: list[dict], first_row: int, config: LabelStepsConfig, chat: bool,
                 checker: Checker) -> tuple[dict[str, list[dict]], Counter]:
    """Sample the chunk's solutions, split them into steps and label every step (the rows of steps.jsonl)."""
    separator, sampling = config.step_separator, config.sampling
    solutions = sample(model, tokenizer, [row["prompt"] for row in rows], sampling.model_copy(update={"seed": row_seed(sampling.seed, 0, first_row)}), chat)
    counts: Counter = Counter()
    items = []  # (row index in the chunk, the solution's text, its steps)
    for i, completions in enumerate(solutions):
        for completion in completions:
            steps = [text for text, _ in split_steps(completion.text, separator)]
            if steps:
                items.append((i, completion.text, steps))
            else:
                counts["no_steps"] += 1
    if not items:
        return {"steps": []}, counts
    owners = [rows[i] for i, _, _ in items]
    numbers = [first_row + i + 1 for i, _, _ in items]
    verdicts: dict[str, list] = {}  # with --answer-fn: each solution's `correct` and each step's `reached`
    if config.step_fn:
        labels = checker.step_labels(owners, [steps for _, _, steps in items], numbers)
    else:
        correct = checker.answers(owners, [text for _, text, _ in items], numbers)
        # Rollouts from just after every step but the last: the prefix is tokenized as a PRM reads it.
        starts = [(n, k) for n, (_, _, steps) in enumerate(items) for k in range(len(steps) - 1)]
        inputs = [step_ids(tokenizer, owners[n]["prompt"], items[n][2][:k + 1], separator, chat)[0] for n, k in starts]
        rolled = sample_ids(model, tokenizer, inputs, sampling.model_copy(
            update={"num_samples": config.rollouts, "seed": row_seed(sampling.seed, 1, first_row)}))
        texts = [separator.join(items[n][2][:k + 1]) + separator + c.text for (n, k), cs in zip(starts, rolled) for c in cs]
        reached_flat = checker.answers([owners[n] for n, _ in starts for _ in range(config.rollouts)], texts,
                                       [numbers[n] for n, _ in starts for _ in range(config.rollouts)])
        reached = [[] for _ in items]
        for index, (n, _) in enumerate(starts):
            reached[n].append(sum(reached_flat[index * config.rollouts:(index + 1) * config.rollouts]))
        labels = [[_label(r, config.rollouts, config.labels) for r in hits] + [float(ok)] for hits, ok in zip(reached, correct)]
        verdicts = {"correct": correct, "reached": [hits + [None] for hits in reached]}
        counts.update(rollouts=len(texts), correct=sum(correct))
    out = []
    for n, (i, _, steps) in enumerate(items):
        out.append({"prompt": rows[i]["prompt"], "completions": steps, "labels": labels[n],
                    **{key: values[n] for key, values in verdicts.items()}})
        counts.update(solutions=1, steps=len(steps), label_sum=float(sum(labels[n])),
                      steps_correct=sum(float(label) > 0.5 for label in labels[n]))
    return {"steps": out}, counts


def _label(reached: int, rollouts: int, kind: str) -> float | bool:
    return reached / rollouts if kind == "soft" else reached > 0


class Checker:
    """The user's answer or step function, called on batches, with every failure named by its prompt row."""

    def __init__(self, reference: str, what: str):
        self.fn, self.name, self.what = load_function(reference, what), reference, what
        parameters = inspect.signature(self.fn).parameters.values()
        self.all_columns = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters)
        self.named = {p.name for p in parameters}
        # The two arguments every call fills (prompts, completions or steps): a column by either name is not passed.
        positional = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
        self.filled = {"prompt", *[p.name for p in parameters if p.kind in positional][:2]}

    def answers(self, rows: list[dict], completions: list[str], numbers: list[int]) -> list[bool]:
        values = self._call(rows, completions, numbers)
        for value, row_number, completion in zip(values, numbers, completions):
            if not _is_bool(value):
                raise ConfigError(f"{self.what} {self.name} returned {value!r} for prompt row {row_number} "
                                  f"(completion {completion[:60]!r}); expected true or false")
        return [bool(value) for value in values]

    def final_answers(self, rows: list[dict], completions: list[str], numbers: list[int]) -> list:
        """A vote function's answers (best-of-n --vote): a string or a number each, None for no answer."""
        values = self._call(rows, completions, numbers)
        for value, row_number, completion in zip(values, numbers, completions):
            if value is not None and (_is_bool(value) or not isinstance(value, (str, Real)) or value != value):
                raise ConfigError(f"{self.what} {self.name} returned {value!r} for prompt row {row_number} "
                                  f"(completion {completion[:60]!r}); expected the final answer as a string or number, or None")
        return [int(v) if isinstance(v, Integral) else float(v) if isinstance(v, Real) else v for v in values]

    def step_labels(self, rows: list[dict], steps: list[list[str]], numbers: list[int]) -> list[list[float | bool]]:
        values = self._call(rows, steps, numbers)
        for value, row_number, solution in zip(values, numbers, steps):
            labels = list(value) if isinstance(value, (list, tuple)) else None
            if labels is None or len(labels) != len(solution):
                raise ConfigError(f"{self.what} {self.name} returned {value!r} for prompt row {row_number}; expected a list of "
                                  f"{len(solution)} labels, one per step")
            for label in labels:
                if not (_is_bool(label) or isinstance(label, (int, float)) and 0 <= label <= 1):
                    raise ConfigError(f"{self.what} {self.name} returned the label {label!r} for prompt row {row_number}; "
                                      "expected true/false or a number in [0, 1]")
        return [[bool(x) if _is_bool(x) else float(x) for x in value] for value in values]

    def _call(self, rows: list[dict], completions: list, numbers: list[int]) -> list:
        if not completions:  # say, no solution of a chunk had a step to roll out from
            return []
        return call_user(f"{self.what} {self.name}", self._apply, list(zip(rows, completions, numbers)),
                         lambda item: f"prompt row {item[2]}: {str(item[1])[:60]!r}")

    def _apply(self, items: list[tuple[dict, Any, int]]) -> Any:
        rows = [row for row, _, _ in items]
        columns = {key: [row.get(key) for row in rows] for key in rows[0] if key not in self.filled}
        kwargs = columns if self.all_columns else {key: value for key, value in columns.items() if key in self.named}
        return self.fn([row["prompt"] for row in rows], [completion for _, completion, _ in items], **kwargs)


def _is_bool(value: Any) -> bool:
    return isinstance(value, bool) or type(value).__name__ == "bool_"  # numpy's bool too
