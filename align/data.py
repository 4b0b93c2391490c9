"""Load data files or hub datasets, detect and validate their format, apply chat templates.

Formats follow TRL's documented dataset formats:
- SFT: `messages` (conversational) | `prompt` + `completion` | `text`
- preference: `prompt` + `chosen` + `rejected` (strings or message lists), optional `margin`
- ranked (reward models): `prompt` + `completions` (a list) + `scores` (one number per completion,
  higher is better): InstructGPT's K-wise comparisons, every pair of a prompt compared in one step
- stepwise (process reward models): `prompt` + `completions` (a list of step strings) + `labels`
  (one per step: true/false, or a number in [0, 1] for a soft label such as Math-Shepherd's)
- prompt-only: `prompt`
"""

from __future__ import annotations

import csv
import json
import logging
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from align import hub
from align.config import DataSpec
from align.errors import ConfigError, DataError

log = logging.getLogger("align")

SFT_FORMATS = {"messages": ("messages",), "prompt-completion": ("prompt", "completion"), "text": ("text",)}
PREFERENCE_FORMATS = {"preference": ("prompt", "chosen", "rejected")}
RANKED_FORMATS = {"ranked": ("prompt", "completions", "scores")}
STEPWISE_FORMATS = {"stepwise": ("prompt", "completions", "labels")}
IGNORE_LABEL = -100.0  # a stepwise example's label at a position that does not end a step
PROMPT_FORMATS = {"prompt-only": ("prompt",)}
SUFFIXES = (".jsonl", ".json", ".parquet", ".csv")


@dataclass
class DataReport:
    """What happened to the rows between the file and the trainer; goes into the manifest."""

    source: str
    format: str = ""
    rows_read: int = 0
    rows_used: int = 0
    dropped: dict[str, int] = field(default_factory=dict)
    truncated: int = 0
    unfinished: int = 0  # completions marked `finished: false`, trained without an end of turn

    def drop(self, reason: str, count: int = 1) -> None:
        self.dropped[reason] = self.dropped.get(reason, 0) + count


# ---------------------------------------------------------------------------------------------
# Reading


def read_rows(path_or_name: str, spec: DataSpec) -> list[dict[str, Any]]:
    """Every row of a local file or hub dataset as a dict, with the column mapping applied."""
    path = Path(path_or_name)
    if path.is_file():
        rows = _read_file(path)
    elif path.exists():
        raise DataError(f"{path}: is a directory; pass a {'/'.join(SUFFIXES)} file")
    elif path.suffix in SUFFIXES or path_or_name.startswith((".", "/", "~")):
        raise DataError(f"{path}: data file not found")
    elif "/" not in path_or_name:
        raise DataError(f"{path}: data file not found (a hub dataset is named owner/name, e.g. stanfordnlp/{path_or_name})")
    else:
        rows = _read_hub(path_or_name, spec.split)
    if not rows:
        raise DataError(f"{path_or_name}: no rows; the data file is empty")
    missing = {expected: found for expected, found in spec.columns.items() if found not in rows[0]}
    if missing:
        expected, found = next(iter(missing.items()))
        raise DataError(f"{path_or_name}: data.columns maps '{expected}' to a column '{found}' that is not in the file "
                        f"(its columns: {', '.join(sorted(rows[0]))})")
    rows = [_rename(row, spec.columns) for row in rows]
    return rows[: spec.max_rows] if spec.max_rows else rows


def _read_file(path: Path) -> list[dict[str, Any]]:
    suffix = path.suffix.lower()
    if suffix == ".jsonl":
        return _read_jsonl(path)
    if suffix == ".json":
        return _read_json(path)
    if suffix == ".csv":
        try:
            with path.open(newline="", encoding="utf-8-sig") as handle:  # -sig: a byte-order mark is skipped
                return list(csv.DictReader(handle))
        except (UnicodeDecodeError, csv.Error) as exc:
            raise DataError(f"{path}: not a readable UTF-8 CSV file ({exc})") from None
    if suffix == ".parquet":
        import pyarrow.parquet as pq

        try:
            return pq.read_table(path).to_pylist()
        except Exception as exc:  # pyarrow raises many types for a damaged file
            raise DataError(f"{path}: not a readable parquet file ({str(exc).splitlines()[0]})") from None
    raise DataError(f"{path}: unsupported file type {suffix!r}; use one of {', '.join(SUFFIXES)}")


def _read_jsonl(path: Path) -> list[dict[str, Any]]:
    rows = []
    with path.open("rb") as handle:
        for number, raw in enumerate(handle, start=1):
            try:
                # A UTF-8 byte-order mark (Windows editors, PowerShell, Excel exports) is not part of the first row.
                line = raw.decode("utf-8-sig" if number == 1 else "utf-8").strip()
            except UnicodeDecodeError:
                raise DataError(f"{path}: line {number}: not valid UTF-8; re-save the file as UTF-8") from None
            if not line:
                continue
            try:
                row = json.loads(line, object_pairs_hook=_no_duplicate_keys)
            except json.JSONDecodeError as exc:
                raise DataError(f"{path}: line {number}: malformed JSON ({exc.msg}); fix or remove that line") from None
            except _DuplicateKey as exc:
                raise DataError(f"{path}: line {number}: has the key '{exc}' twice; keep one") from None
            if not isinstance(row, dict):
                raise DataError(f"{path}: line {number}: expected a JSON object, got {type(row).__name__}")
            rows.append(row)
    return rows


class _DuplicateKey(ValueError):
    pass


def _no_duplicate_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """json.loads keeps the last of two equal keys silently; a data row like that is a mistake."""
    row = dict(pairs)
    if len(row) != len(pairs):
        seen: set[str] = set()
        raise _DuplicateKey(next(key for key, _ in pairs if key in seen or seen.add(key)))
    return row


def _read_json(path: Path) -> list[dict[str, Any]]:
    try:
        loaded = json.loads(path.read_text(encoding="utf-8-sig"), object_pairs_hook=_no_duplicate_keys)
    except UnicodeDecodeError:
        raise DataError(f"{path}: not valid UTF-8; re-save the file as UTF-8") from None
    except _DuplicateKey as exc:
        raise DataError(f"{path}: an object has the key '{exc}' twice; keep one") from None
    except json.JSONDecodeError as exc:
        raise DataError(f"{path}: line {exc.lineno}: malformed JSON ({exc.msg})") from None
    if isinstance(loaded, dict) and len(loaded) == 1 and isinstance(next(iter(loaded.values())), list):
        loaded = next(iter(loaded.values()))
    if not isinstance(loaded, list):
        raise DataError(f"{path}: expected a JSON list of objects (or JSONL, one object per line)")
    for index, row in enumerate(loaded):
        if not isinstance(row, dict):
            raise DataError(f"{path}: item {index}: expected a JSON object, got {type(row).__name__}")
    return loaded


def _read_hub(name: str, split: str) -> list[dict[str, Any]]:
    try:
        import datasets

        if not hub.reachable():
            datasets.config.HF_HUB_OFFLINE = True  # the local datasets cache only

        return datasets.load_dataset(name, split=split).to_list()
    except Exception as exc:  # the hub client raises many types when offline
        raise DataError(
            f"{name}: not a local file, and loading it from the Hugging Face Hub failed "
            f"({exc.__class__.__name__}); check the path, or download the dataset and pass the local file"
        ) from None


def _rename(row: dict[str, Any], columns: dict[str, str]) -> dict[str, Any]:
    if not columns:
        return row
    renamed = {k: v for k, v in row.items() if k not in columns.values()}
    for expected, found in columns.items():
        if found in row:
            renamed[expected] = row[found]
    return renamed


# ---------------------------------------------------------------------------------------------
# Formats and validation


def detect_format(rows: list[dict], formats: dict[str, tuple[str, ...]], source: str) -> str:
    """The first format whose columns the data has; otherwise say what was found and expected."""
    found = set(rows[0])
    for name, needed in formats.items():
        if set(needed) <= found:
            return name
    expected = " | ".join(" + ".join(cols) for cols in formats.values())
    raise DataError(
        f"{source}: found columns {sorted(found)}; expected {expected} "
        "(map other names with data.columns, e.g. --set data.columns.prompt=question)"
    )


def validate_rows(rows: list[dict], columns: tuple[str, ...], source: str) -> None:
    """Every row has every column, each a non-empty string or a list of chat messages."""
    for index, row in enumerate(rows, start=1):
        for column in columns:
            if column not in row or row[column] is None:
                raise DataError(f"{source}: row {index}: missing '{column}'")
            value = row[column]
            if column == "completions":  # checked with the column it pairs with: scores or labels
                continue
            if column in LIST_CHECKS:
                LIST_CHECKS[column](row, f"{source}: row {index}")
                continue
            if column == "messages" and not is_messages(value):
                raise DataError(
                    f"{source}: row {index}: 'messages' must be a list of {{'role', 'content'}} messages, got {type(value).__name__}"
                )
            if isinstance(value, str):
                if column == "prompt" or value.strip():
                    continue
                raise DataError(f"{source}: row {index}: '{column}' is an empty string")
            if not is_messages(value):
                raise DataError(
                    f"{source}: row {index}: '{column}' must be a string or a list of "
                    f"{{'role', 'content'}} messages, got {type(value).__name__}"
                )
        if "margin" in row and not isinstance(row["margin"], (int, float)):
            raise DataError(f"{source}: row {index}: 'margin' must be a number, got {row['margin']!r}")
        for flag in ("finished", "chosen_finished", "rejected_finished"):
            if flag in row and not isinstance(row[flag], bool):
                raise DataError(f"{source}: row {index}: '{flag}' must be true or false (false: the response was cut at a "
                                f"length limit and is trained without an end of turn), got {row[flag]!r}")


def _check_ranked(row: dict, where: str) -> None:
    """A ranked row: at least two non-empty completions (strings or message lists) and one finite score each."""
    completions, scores = row["completions"], row["scores"]
    if not isinstance(completions, list) or len(completions) < 2:
        raise DataError(f"{where}: 'completions' must be a list of at least two responses to rank, got {completions!r:.60}")
    for k, completion in enumerate(completions):
        if not ((isinstance(completion, str) and completion.strip()) or is_messages(completion)):
            raise DataError(f"{where}: completion {k}: must be a non-empty string or a list of {{'role', 'content'}} messages")
    if not isinstance(scores, list) or len(scores) != len(completions):
        raise DataError(f"{where}: 'scores' must be a list with one number per completion ({len(completions)}), got {scores!r:.60}")
    for k, value in enumerate(scores):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or value != value or abs(value) == float("inf"):
            raise DataError(f"{where}: score {k}: must be a finite number, got {value!r}")


def _check_steps(row: dict, where: str) -> None:
    """A stepwise row: at least one non-empty step string and one label per step, a bool or a number in [0, 1]."""
    steps, labels = row["completions"], row["labels"]
    if not isinstance(steps, list) or not steps:
        raise DataError(f"{where}: 'completions' must be a list of step strings, got {steps!r:.60}")
    for k, step in enumerate(steps):
        if not isinstance(step, str) or not step.strip():
            raise DataError(f"{where}: step {k}: must be a non-empty string, got {step!r:.60}")
    if not isinstance(labels, list) or len(labels) != len(steps):
        raise DataError(f"{where}: 'labels' must be a list with one label per step ({len(steps)}), got {labels!r:.60}")
    for k, label in enumerate(labels):
        if not isinstance(label, (bool, int, float)) or not 0 <= label <= 1:  # NaN fails the range too
            raise DataError(f"{where}: label {k}: must be true/false or a number in [0, 1], got {label!r}")


LIST_CHECKS = {"scores": _check_ranked, "labels": _check_steps}  # ranked and stepwise rows' list columns


def is_messages(value: Any) -> bool:
    return (
        isinstance(value, list)
        and bool(value)
        and all(
            isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str) for m in value
        )
    )


def use_chat_template(tokenizer, spec: DataSpec, conversational: bool, source: str) -> bool:
    """Whether rows are rendered with the tokenizer's chat template."""
    has_template = bool(getattr(tokenizer, "chat_template", None))
    if (conversational or spec.chat_template == "always") and not has_template:
        raise DataError(
            f"{source}: conversational data needs a chat template, and this model's tokenizer has none; "
            "set model.chat_template to a Jinja file, or use prompt/completion text data with data.chat_template=never"
        )
    if conversational:
        return True
    return spec.chat_template == "always" or (spec.chat_template == "auto" and has_template)


def last_text(value: str | list) -> str:
    """A string as it is; a message list as the text of its last message."""
    return value if isinstance(value, str) else value[-1]["content"]


def as_messages(value: str | list, role: str) -> list[dict[str, str]]:
    return value if isinstance(value, list) else [{"role": role, "content": value}]


def split_eval(rows: list, spec: DataSpec, seed: int) -> tuple[list, list]:
    """Hold out `eval_fraction` of the rows (seeded); at least one row on each side."""
    if not spec.eval_fraction:
        return rows, []
    shuffled = rows[:]
    random.Random(seed).shuffle(shuffled)
    count = max(1, round(len(rows) * spec.eval_fraction))
    if count >= len(rows):
        raise DataError(f"{spec.path}: {len(rows)} rows are too few to hold out eval_fraction={spec.eval_fraction}")
    return shuffled[count:], shuffled[:count]


def load_split(spec: DataSpec, formats: dict[str, tuple[str, ...]], seed: int) -> tuple[str, list, list]:
    """(format, train rows, eval rows) from data.path and data.eval_path / data.eval_fraction."""
    kind, train, held = load_numbered_split(spec, formats, seed)
    return kind, [row for _, row in train], [row for _, row in held]


def load_numbered_split(spec: DataSpec, formats: dict[str, tuple[str, ...]], seed: int) -> tuple[str, list, list]:
    """load_split with each row as (its number in its file, row): eval_fraction shuffles them, and an
    error about a row must name the file's."""
    rows = read_rows(spec.path, spec)
    kind = detect_format(rows, formats, spec.path)
    validate_rows(rows, formats[kind], spec.path)
    if spec.eval_path:
        eval_rows = read_rows(spec.eval_path, spec)
        validate_rows(eval_rows, formats[detect_format(eval_rows, {kind: formats[kind]}, spec.eval_path)], spec.eval_path)
        return kind, list(enumerate(rows, start=1)), list(enumerate(eval_rows, start=1))
    train_rows, eval_rows = split_eval(list(enumerate(rows, start=1)), spec, seed)  # shuffled as the rows alone would be
    return kind, train_rows, eval_rows


def prompts_to_sample(spec: DataSpec, tokenizer, seed: int, window: int, new_tokens: int,
                      continued: str = "") -> tuple[list[dict], list, bool]:
    """(rows, their prompts, whether the chat template renders them) of a prompt-only file to sample
    from. Every prompt must leave room for `new_tokens` in the model's context of `window` tokens (past
    it, learned positions fail and rotary ones give noise), twice when a sample is `continued` (why, in
    words): else one line names the first row that does not."""
    rows = every_prompt(spec, seed)
    prompts = [row["prompt"] for row in rows]
    chat = use_chat_template(tokenizer, spec, is_messages(prompts[0]), spec.path)
    for number, prompt in enumerate(prompts, start=1):
        check_room(spec.path, number, len(prompt_ids(tokenizer, prompt, chat)), new_tokens, window, continued=continued)
    return rows, prompts, chat


def every_prompt(spec: DataSpec, seed: int) -> list[dict]:
    """The rows of a prompt-only file a stage that trains nothing samples from: all of them (held out for
    evaluating training, they would be skipped unsaid)."""
    if spec.eval_fraction or spec.eval_path:
        key = "eval_fraction" if spec.eval_fraction else "eval_path"
        raise ConfigError(f"prompts.{key} holds prompts out of training, and this stage trains nothing: it samples every "
                          f"prompt of {spec.path}; remove prompts.{key}")
    return load_split(spec, PROMPT_FORMATS, seed)[1]


def check_room(source: str, number: int, length: int, new_tokens: int, window: int, fix: str = "shorten it",
               continued: str = "") -> None:
    """A prompt of `length` tokens at row `number` must leave room for `new_tokens` in the context
    (twice `new_tokens` when a sample is `continued`, said why)."""
    if length + new_tokens * (2 if continued else 1) > window:
        twice = f" twice ({continued})" if continued else ""
        raise DataError(f"{source}: row {number}: the prompt is {length} tokens, and with max_new_tokens={new_tokens}{twice} "
                        f"that exceeds the model's context of {window}; {fix} or lower --max-new-tokens")


def fitting_prompts(rows: list[tuple[int, dict]], source: str, tokenizer, chat: bool, spec: DataSpec, new_tokens: int,
                    window: int, report: DataReport, whole: str = "") -> tuple[list, list[list[int]]]:
    """(prompts, their ids) of (row number in `source`, row) pairs for online RL. A prompt over
    spec.max_length is dropped (overlong=drop) or cut from the start, its end (the question and the
    assistant header) kept; where `whole` names a stage that hands prompts on whole (to TRL), it is
    refused naming its row instead. One leaving no room for `new_tokens` in the context is refused."""
    limit, prompts, ids = spec.max_length, [], []
    for number, row in rows:
        tokens = prompt_ids(tokenizer, row["prompt"], chat)
        if len(tokens) > limit:
            if spec.overlong == "drop":
                report.drop(f"prompt longer than max_length={limit}")
                continue
            if whole:
                raise DataError(f"{source}: row {number}: the prompt is {len(tokens)} tokens, over prompts.max_length={limit}, "
                                f"and {whole} cannot cut a prompt; shorten it, raise prompts.max_length or set prompts.overlong=drop")
            tokens = tokens[-limit:]
            report.truncated += 1
        check_room(source, number, len(tokens), new_tokens, window, fix="shorten it" if whole else "shorten it, lower prompts.max_length")
        prompts.append(row["prompt"])
        ids.append(tokens)
    if not ids:
        raise DataError(f"{source}: no prompts left after filtering ({report.dropped})")
    return prompts, ids

# ---------------------------------------------------------------------------------------------
# Tokenization


def render_ids(tokenizer, messages_or_text, *, chat: bool, generation_prompt: bool = False) -> list[int]:
    if chat:
        return list(
            tokenizer.apply_chat_template(
                messages_or_text, tokenize=True, add_generation_prompt=generation_prompt, return_dict=False
            )
        )
    return tokenizer(messages_or_text, add_special_tokens=True)["input_ids"]


def prompt_ids(tokenizer, prompt: str | list, chat: bool) -> list[int]:
    """Token ids of a prompt as a model continues it: with the chat template's assistant header when
    `chat`, else the text with the tokenizer's special tokens (BOS)."""
    if chat:
        return render_ids(tokenizer, as_messages(prompt, "user"), chat=True, generation_prompt=True)
    return render_ids(tokenizer, prompt, chat=False)


def common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def sft_examples(rows: list[dict], kind: str, completion_only: bool) -> list[tuple[Any, Any, bool]]:
    """(prompt, completion, finished) triples; prompt "" means train on everything.

    A conversation yields one example per assistant turn, with the turns before it as the
    prompt, so every assistant turn is trained on and no user turn is. A prompt-completion row
    with `finished: false` (a sample cut at its length limit, as `generate` and `best-of-n` mark
    them) is trained without an end of turn, so the model does not learn to stop mid-sentence; in a
    conversation with `finished: false` (as `critique` marks a cut revision) that is its last
    assistant turn.
    """
    examples = []
    for row in rows:
        if kind == "text":
            examples.append(("", row["text"], True))
        elif kind == "prompt-completion":
            examples.append((row["prompt"], row["completion"], row.get("finished", True)))
        elif not completion_only:
            examples.append(([], row["messages"], row.get("finished", True)))
        else:
            messages, finished = row["messages"], row.get("finished", True)
            last = max((i for i, m in enumerate(messages) if m["role"] == "assistant"), default=-1)
            examples += [(messages[:i], [m], finished or i != last)
                         for i, m in enumerate(messages) if m["role"] == "assistant" and i > 0]
    return examples


def tokenize_sft(examples, tokenizer, chat: bool, spec: DataSpec, report: DataReport) -> list[dict[str, list[int]]]:
    """input_ids and completion_mask per example; the mask marks the tokens the loss is taken on.

    The prompt is masked by rendering it alone (with the generation prompt) and taking the
    common prefix with the full rendering: this works for any chat template, including ones
    without `{% generation %}` markers (SmolLM2's among them).
    """
    processed = []
    for prompt, completion, finished in examples:
        if chat:
            prompt_msgs = as_messages(prompt, "user") if prompt else []
            full = render_ids(tokenizer, prompt_msgs + as_messages(completion, "assistant"), chat=True)
            if prompt_msgs:
                prompt_ids = render_ids(tokenizer, prompt_msgs, chat=True, generation_prompt=True)
            else:  # no prompt: the mask starts at the first token; an unfinished row is cut after its last turn's header
                before = as_messages(completion, "assistant")[:-1] + as_messages("", "assistant")
                prompt_ids = [] if finished else render_ids(tokenizer, before, chat=True)
        else:
            full = render_ids(tokenizer, prompt + completion, chat=False) + [tokenizer.eos_token_id] * finished
            prompt_ids = render_ids(tokenizer, prompt, chat=False) if prompt else []
        start = common_prefix(prompt_ids, full)
        if chat and not finished:  # the response as sampled: the header, then its tokens, no end of turn
            full = full[:start] + tokenizer(last_text(completion), add_special_tokens=False)["input_ids"]
            start = start if prompt_msgs else 0
        report.unfinished += not finished
        mask = [0] * start + [1] * (len(full) - start)
        if len(full) > spec.max_length:
            if spec.overlong == "drop":
                report.drop(f"longer than max_length={spec.max_length}")
                continue
            full, mask = full[: spec.max_length], mask[: spec.max_length]
            report.truncated += 1
            if not any(mask):
                report.drop(f"prompt alone fills max_length={spec.max_length}")
                continue
        processed.append({"input_ids": full, "completion_mask": mask})
    return processed


def preference_examples(rows: list[dict], tokenizer, chat: bool, spec: DataSpec, report: DataReport,
                        sides_finished: bool = False):
    """Rows ready for TRL's DPO/Reward trainers; identical pairs and (if asked) over-long pairs dropped.
    With `sides_finished` (DPO) every row carries `chosen_finished` and `rejected_finished` (true unless
    the row says false: a side cut at a length limit, as `best-of-n` and `label` mark them, which
    dpo trains without an end of turn)."""
    examples = []
    for row in rows:
        if row["chosen"] == row["rejected"]:
            report.drop("chosen identical to rejected")
            continue
        example = dict(row)
        if chat:
            example["prompt"] = as_messages(row["prompt"], "user") if row["prompt"] else []
            example["chosen"] = as_messages(row["chosen"], "assistant")
            example["rejected"] = as_messages(row["rejected"], "assistant")
        sides = [render_ids(tokenizer, example["prompt"] + example[side], chat=chat) for side in ("chosen", "rejected")]
        if max(map(len, sides)) > spec.max_length:
            if spec.overlong == "drop":
                report.drop(f"longer than max_length={spec.max_length}")
                continue
            # Truncation keeps the start: a prompt that fills max_length leaves neither side a token to compare
            # (TRL's DPO trainer drops such a pair on its own, unreported).
            prompt = prompt_ids(tokenizer, row["prompt"], chat) if row["prompt"] else []
            if min(common_prefix(prompt, side) for side in sides) >= spec.max_length:
                report.drop(f"prompt alone fills max_length={spec.max_length}")
                continue
            report.truncated += 1
        kept = {k: example[k] for k in ("prompt", "chosen", "rejected", "margin") if k in example}
        if sides_finished:
            for side in ("chosen", "rejected"):
                kept[f"{side}_finished"] = row.get(f"{side}_finished", True)
                report.unfinished += not kept[f"{side}_finished"]
        examples.append(kept)
    return examples


def load_preference_data(spec: DataSpec, tokenizer, seed: int) -> tuple[DataReport, list[dict], list[dict]]:
    """Train and eval preference pairs, validated, filtered and rendered for TRL's trainers."""
    _, train_rows, eval_rows = load_split(spec, PREFERENCE_FORMATS, seed)
    return _preference_data(spec, tokenizer, train_rows, eval_rows, sides_finished=True)


def _preference_data(spec: DataSpec, tokenizer, train_rows: list[dict], eval_rows: list[dict], sides_finished: bool = False):
    chat = use_chat_template(tokenizer, spec, is_messages(train_rows[0]["chosen"]), spec.path)
    report = DataReport(spec.path, format="preference", rows_read=len(train_rows) + len(eval_rows))
    train = preference_examples(train_rows, tokenizer, chat, spec, report, sides_finished)
    evals = preference_examples(eval_rows, tokenizer, chat, spec, report, sides_finished)
    if not train:
        raise DataError(f"{spec.path}: no usable preference pairs left after filtering ({report.dropped})")
    report.rows_used = len(train)
    warn_report(report)
    return report, train, evals


def ranked_examples(rows: list[dict], tokenizer, chat: bool, spec: DataSpec, report: DataReport, min_gap: float,
                    margins: bool) -> list[dict]:
    """Ranked rows tokenized for RankedRewardTrainer: each completion's ids (rendered as TRL's
    RewardTrainer renders a pair's side), and every pair (better, worse) whose scores differ by more
    than min_gap, with the score gap as its margin when `margins`. Over-long completions are dropped."""
    examples = []
    for row in rows:
        prompt = (as_messages(row["prompt"], "user") if row["prompt"] else []) if chat else row["prompt"]
        kept, ids = [], []
        for completion, value in zip(row["completions"], row["scores"]):
            if chat:
                sequence = render_ids(tokenizer, prompt + as_messages(completion, "assistant"), chat=True)
            else:
                text = prompt + completion
                sequence = render_ids(tokenizer, text if text.endswith(tokenizer.eos_token) else text + tokenizer.eos_token, chat=False)
            if len(sequence) > spec.max_length:
                report.drop(f"completion longer than max_length={spec.max_length}")
                continue
            kept.append(float(value))
            ids.append(sequence)
        pairs = [(i, j) for i in range(len(kept)) for j in range(len(kept)) if kept[i] - kept[j] > min_gap]
        if not pairs:
            report.drop(f"no two completions' scores differ by more than min_gap={min_gap}")
            continue
        used = sorted({k for pair in pairs for k in pair})  # a completion in no comparison costs a forward for nothing
        index = {k: n for n, k in enumerate(used)}
        examples.append({
            "sequence_ids": [ids[k] for k in used],
            "pairs": [[index[i], index[j]] for i, j in pairs],
            "margins": [kept[i] - kept[j] if margins else 0.0 for i, j in pairs],
        })
    return examples


def load_reward_data(spec: DataSpec, tokenizer, seed: int, min_gap: float = 0.0, margins: bool = False):
    """(format, report, train, eval) for a reward model: preference pairs for TRL's RewardTrainer,
    or ranked rows for RankedRewardTrainer."""
    kind, train_rows, eval_rows = load_split(spec, {**PREFERENCE_FORMATS, **RANKED_FORMATS}, seed)
    if kind == "preference":
        return (kind, *_preference_data(spec, tokenizer, train_rows, eval_rows))
    first = train_rows[0]["completions"][0]
    chat = use_chat_template(tokenizer, spec, is_messages(first), spec.path)
    report = DataReport(spec.path, format=kind, rows_read=len(train_rows) + len(eval_rows))
    train = ranked_examples(train_rows, tokenizer, chat, spec, report, min_gap, margins)
    evals = ranked_examples(eval_rows, tokenizer, chat, spec, report, min_gap, margins)
    if not train:
        raise DataError(f"{spec.path}: no prompt has two completions to compare after filtering ({report.dropped})")
    report.rows_used = len(train)
    warn_report(report)
    return kind, report, train, evals


def step_ids(tokenizer, prompt: str | list, steps: list[str], separator: str, chat: bool) -> tuple[list[int], list[int]]:
    """(input_ids, the position of each step's label): the prompt's ids, then each step's ids and the
    separator's, each tokenized alone; a step's label sits on the last token of its separator."""
    ids = prompt_ids(tokenizer, prompt, chat)
    separator_ids = tokenizer(separator, add_special_tokens=False)["input_ids"]
    ends = []
    for step in steps:
        ids = ids + tokenizer(step, add_special_tokens=False)["input_ids"] + separator_ids
        ends.append(len(ids) - 1)
    return ids, ends


def split_steps(text: str, separator: str) -> list[tuple[str, int]]:
    """A solution's steps, each with the index in `text` one past its last character. Empty pieces
    (as between two separators, or after the last one) are not steps."""
    found, at = [], 0
    for piece in text.split(separator):
        if piece.strip():
            found.append((piece, at + len(piece)))
        at += len(piece) + len(separator)
    return found


def check_separator(tokenizer, separator: str) -> None:
    """The separator must be tokens of its own that decode back to it."""
    ids = tokenizer(separator, add_special_tokens=False)["input_ids"] if separator else []
    if not ids or tokenizer.decode(ids) != separator:
        raise DataError(f"step separator {separator!r} does not tokenize to tokens of its own that decode back to it "
                        f"(got {ids}); choose another (the default is a newline)")


def stepwise_examples(rows: list[dict], tokenizer, chat: bool, spec: DataSpec, report: DataReport, separator: str,
                      last_step_only: bool = False, numbers: list[int] | None = None, source: str | None = None) -> list[dict]:
    """Stepwise rows tokenized for a process reward model: input_ids and one label per position, the
    step's label (a float in [0, 1]) on the last token of each step's separator and IGNORE_LABEL elsewhere.
    A step that holds the separator would split differently when scored, so it is refused; over-long
    rows keep the steps that fit (truncate) or are dropped. `steps` names each labelled step by what
    comes before it (the prompt and the earlier steps) and its own text: how sibling steps are found.
    An error names the row by `numbers` (its line in `source`, default spec.path) when given."""
    examples = []
    for index, row in zip(numbers or range(1, len(rows) + 1), rows):
        for k, step in enumerate(row["completions"]):
            if separator in step:
                raise DataError(f"{source or spec.path}: row {index}: step {k} contains the step separator {separator!r}; "
                                "split it into two steps or choose another separator (prm --step-separator)")
        ids, ends = step_ids(tokenizer, row["prompt"], row["completions"], separator, chat)
        labels = [float(label) for label in row["labels"]]
        steps = list(range(len(ends)))
        if last_step_only:
            ends, labels, steps = ends[-1:], labels[-1:], steps[-1:]
        if len(ids) > spec.max_length:
            kept = [(end, label, k) for end, label, k in zip(ends, labels, steps) if end < spec.max_length]
            if spec.overlong == "drop" or not kept:
                report.drop(f"longer than max_length={spec.max_length}" if spec.overlong == "drop"
                            else f"no labelled step fits in max_length={spec.max_length}")
                continue
            ids, (ends, labels, steps) = ids[:spec.max_length], zip(*kept)
            report.truncated += 1
        position_labels = [IGNORE_LABEL] * len(ids)
        for end, label in zip(ends, labels):
            position_labels[end] = label
        examples.append({"input_ids": ids, "labels": position_labels,  # what comes before each labelled step, and the step
                         "steps": [(json.dumps([row["prompt"], *row["completions"][:k]]), row["completions"][k]) for k in steps]})
    return examples


def load_stepwise_data(spec: DataSpec, tokenizer, seed: int, separator: str, last_step_only: bool = False):
    """(report, train, eval) for a process reward model."""
    check_separator(tokenizer, separator)
    _, train_rows, eval_rows = load_numbered_split(spec, STEPWISE_FORMATS, seed)  # (line in its file, row)
    chat = use_chat_template(tokenizer, spec, is_messages(train_rows[0][1]["prompt"]), spec.path)
    report = DataReport(spec.path, format="stepwise", rows_read=len(train_rows) + len(eval_rows))
    train = stepwise_examples([r for _, r in train_rows], tokenizer, chat, spec, report, separator, last_step_only,
                              numbers=[n for n, _ in train_rows])
    # Held-out rows are scored on every step, --last-step-only or not: what a PRM is asked to do.
    evals = stepwise_examples([r for _, r in eval_rows], tokenizer, chat, spec, report, separator,
                              numbers=[n for n, _ in eval_rows], source=spec.eval_path or spec.path)
    if not train:
        raise DataError(f"{spec.path}: no stepwise rows left after filtering ({report.dropped})")
    report.rows_used = len(train)
    warn_report(report)
    return report, train, evals


def warn_report(report: DataReport) -> None:
    for reason, count in report.dropped.items():
        log.warning("%s: dropped %d row(s): %s", report.source, count, reason)
    if report.truncated:
        log.warning("%s: truncated %d row(s) to max_length", report.source, report.truncated)
    if report.unfinished:
        log.info("%s: %d response(s) marked as cut at a length limit (finished: false) are trained without an end of turn",
                 report.source, report.unfinished)
