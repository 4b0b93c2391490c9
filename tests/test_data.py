import json

import pytest

from align.config import DataSpec
from align.data import (
    PREFERENCE_FORMATS, SFT_FORMATS, DataReport, detect_format, load_split, preference_examples, read_rows,
    sft_examples, tokenize_sft, use_chat_template, validate_rows,
)
from align.errors import DataError
from align.tiny import build_tokenizer
from conftest import write_jsonl


@pytest.fixture(scope="module")
def tokenizer():
    return build_tokenizer()


def spec(path, **kw):
    return DataSpec(path=str(path), **kw)


def test_reads_jsonl_json_csv_and_parquet_alike(tmp_path):
    rows = [{"prompt": "a", "completion": "b"}, {"prompt": "c", "completion": "d"}]
    write_jsonl(tmp_path / "x.jsonl", rows)
    (tmp_path / "x.json").write_text(json.dumps({"data": rows}))
    (tmp_path / "x.csv").write_text("prompt,completion\na,b\nc,d\n")
    import pyarrow as pa, pyarrow.parquet as pq

    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "x.parquet")
    for suffix in ("jsonl", "json", "csv", "parquet"):
        assert read_rows(str(tmp_path / f"x.{suffix}"), spec(tmp_path / f"x.{suffix}")) == rows
    # The same text files saved with a UTF-8 byte-order mark (Windows editors, PowerShell, Excel): the same rows
    for suffix in ("jsonl", "json", "csv"):
        marked = tmp_path / f"bom.{suffix}"
        marked.write_bytes(b"\xef\xbb\xbf" + (tmp_path / f"x.{suffix}").read_bytes())
        assert read_rows(str(marked), spec(marked)) == rows, suffix


@pytest.mark.parametrize(
    "content, fragment",
    [
        (b'{"prompt": "a"}\n{"prompt": "b"}\n{"prompt": oops}\n', "line 3: malformed JSON"),
        (b'{"prompt": "a"}\n[1, 2]\n', "line 2: expected a JSON object, got list"),
        (b'{"prompt": "caf\xe9"}\n', "line 1: not valid UTF-8"),
        (b"", "no rows; the data file is empty"),
        (b"\n\n", "no rows; the data file is empty"),
    ],
)
def test_malformed_files_name_the_line(tmp_path, content, fragment):
    path = tmp_path / "bad.jsonl"
    path.write_bytes(content)
    with pytest.raises(DataError, match=fragment) as info:
        read_rows(str(path), spec(path))
    assert str(path) in str(info.value)


def test_missing_files_and_unreachable_hub_datasets(tmp_path):
    with pytest.raises(DataError, match="data file not found"):
        read_rows(str(tmp_path / "nope.jsonl"), spec("nope.jsonl"))
    with pytest.raises(DataError, match=r"imdb: data file not found \(a hub dataset is named owner/name"):
        read_rows("imdb", spec("imdb"))
    with pytest.raises(DataError, match="Hugging Face Hub failed"):
        read_rows("align-tests-nobody/no-such-dataset", spec("align-tests-nobody/no-such-dataset"))


def test_format_detection_says_what_was_found_and_expected():
    assert detect_format([{"messages": []}], SFT_FORMATS, "f") == "messages"
    assert detect_format([{"prompt": "", "completion": ""}], SFT_FORMATS, "f") == "prompt-completion"
    with pytest.raises(DataError, match=r"found columns \['answer', 'question'\]; expected prompt \+ chosen \+ rejected"):
        detect_format([{"question": "q", "answer": "a"}], PREFERENCE_FORMATS, "f")


def test_column_mapping_renames_before_detection(tmp_path):
    path = write_jsonl(tmp_path / "x.jsonl", [{"question": "q", "good": "g", "bad": "b"}])
    rows = read_rows(str(path), spec(path, columns={"prompt": "question", "chosen": "good", "rejected": "bad"}))
    assert rows == [{"prompt": "q", "chosen": "g", "rejected": "b"}]


@pytest.mark.parametrize(
    "row, fragment",
    [
        ({"prompt": "p", "chosen": 3, "rejected": "r"}, "row 2: 'chosen' must be a string or a list of"),
        ({"prompt": "p", "chosen": "", "rejected": "r"}, "row 2: 'chosen' is an empty string"),
        ({"prompt": "p", "chosen": [{"role": "assistant"}], "rejected": "r"}, "row 2: 'chosen' must be"),
        ({"prompt": "p", "chosen": "c", "rejected": "r", "margin": "big"}, "row 2: 'margin' must be a number"),
        ({"prompt": "p", "chosen": "c"}, "row 2: missing 'rejected'"),
    ],
)
def test_wrong_types_name_the_row_and_column(row, fragment):
    good = {"prompt": "p", "chosen": "c", "rejected": "r"}
    with pytest.raises(DataError, match=fragment):
        validate_rows([good, row], PREFERENCE_FORMATS["preference"], "pairs.jsonl")


def test_eval_fraction_holds_out_rows_deterministically(tmp_path):
    path = write_jsonl(tmp_path / "x.jsonl", [{"text": f"row {i}"} for i in range(20)])
    kind, train, evals = load_split(spec(path, eval_fraction=0.25), SFT_FORMATS, seed=3)
    assert kind == "text" and len(train) == 15 and len(evals) == 5
    assert load_split(spec(path, eval_fraction=0.25), SFT_FORMATS, seed=3)[2] == evals
    assert not {r["text"] for r in train} & {r["text"] for r in evals}


def test_conversations_train_on_every_assistant_turn_and_no_user_turn(tokenizer):
    messages = [
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": "hello friend"},
        {"role": "user", "content": "bye"},
        {"role": "assistant", "content": "good bye"},
    ]
    examples = sft_examples([{"messages": messages}], "messages", completion_only=True)
    assert [(len(prompt), finished) for prompt, _, finished in examples] == [(1, True), (3, True)]
    report = DataReport("x")
    rows = tokenize_sft(examples, tokenizer, chat=True, spec=spec("x"), report=report)
    trained = [tokenizer.decode([t for t, m in zip(r["input_ids"], r["completion_mask"]) if m]) for r in rows]
    # The template renders "<|im_start|>assistant\n" + content + "<|im_end|>\n": only content,
    # the end-of-turn token and its newline are trained; the header and the user turns are not.
    assert trained == ["hello friend<|im_end|>\n", "good bye<|im_end|>\n"]
    full = tokenizer.decode(rows[1]["input_ids"])
    assert full.startswith("<|im_start|>user\nhi<|im_end|>") and "bye" in full


def test_plain_text_prompt_completion_masks_the_prompt_and_appends_eos(tokenizer):
    rows = tokenize_sft([("Q: two? A:", " yes", True)], tokenizer, chat=False, spec=spec("x"), report=DataReport("x"))
    trained = [t for t, m in zip(rows[0]["input_ids"], rows[0]["completion_mask"]) if m]
    assert tokenizer.decode(trained) == " yes<|im_end|>"


def test_a_completion_cut_at_its_length_limit_is_trained_without_an_end_of_turn(tokenizer):
    rows = [{"prompt": "hi", "completion": "hello there", "finished": False},
            {"prompt": "hi", "completion": "hello there", "finished": True},
            {"prompt": "hi", "completion": "hello there"},
            {"prompt": "", "completion": "hello there", "finished": False},
            {"prompt": "", "completion": "hello there"}]
    validate_rows(rows, SFT_FORMATS["prompt-completion"], "best.jsonl")
    examples = sft_examples(rows, "prompt-completion", completion_only=True)
    report = DataReport("x")
    cut, ended, default, cut_alone, ended_alone = tokenize_sft(examples, tokenizer, chat=True, spec=spec("x"), report=report)
    trained = lambda row: tokenizer.decode([t for t, m in zip(row["input_ids"], row["completion_mask"]) if m])
    assert trained(ended) == trained(default) == "hello there<|im_end|>\n"
    assert trained(cut) == "hello there" and report.unfinished == 2
    # The cut row is the sampler's sequence: the prompt with the assistant header, then the response's tokens.
    header = tokenizer.apply_chat_template([{"role": "user", "content": "hi"}], add_generation_prompt=True, return_dict=False)
    assert cut["input_ids"] == list(header) + tokenizer("hello there", add_special_tokens=False)["input_ids"]
    assert ended["input_ids"][:len(cut["input_ids"])] == cut["input_ids"]
    # Without a prompt everything is trained; the cut row keeps the assistant header and loses the end of turn.
    assert tokenizer.decode(ended_alone["input_ids"]).endswith("assistant\nhello there<|im_end|>\n")
    assert tokenizer.decode(cut_alone["input_ids"]).endswith("assistant\nhello there") and all(cut_alone["completion_mask"])
    plain = tokenize_sft([("Q: two? A:", " yes", False)], tokenizer, chat=False, spec=spec("x"), report=report)
    assert tokenizer.decode([t for t, m in zip(plain[0]["input_ids"], plain[0]["completion_mask"]) if m]) == " yes"
    with pytest.raises(DataError, match=r"best.jsonl: row 2: 'finished' must be true or false .*got 'no'"):
        validate_rows([rows[0], {**rows[0], "finished": "no"}], SFT_FORMATS["prompt-completion"], "best.jsonl")


def test_a_conversation_whose_last_turn_was_cut_is_trained_without_its_end_of_turn(tokenizer):
    """`finished: false` on a messages row (critique's cut revisions) cuts its last assistant turn
    only: earlier assistant turns keep their end of turn, with the loss on responses or on everything."""
    turns = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"},
             {"role": "user", "content": "more"}, {"role": "assistant", "content": "hello there"}]
    rows = [{"messages": turns, "finished": False}, {"messages": turns}]
    validate_rows(rows, SFT_FORMATS["messages"], "sft.jsonl")
    trained = lambda row: tokenizer.decode([t for t, m in zip(row["input_ids"], row["completion_mask"]) if m])
    report = DataReport("x")
    first, cut, first_ended, ended = tokenize_sft(sft_examples(rows, "messages", completion_only=True), tokenizer, chat=True,
                                                  spec=spec("x"), report=report)
    assert trained(first) == trained(first_ended) == "hello<|im_end|>\n"
    assert trained(cut) == "hello there" and trained(ended) == "hello there<|im_end|>\n" and report.unfinished == 1
    header = tokenizer.apply_chat_template(turns[:3], add_generation_prompt=True, return_dict=False)
    assert cut["input_ids"] == list(header) + tokenizer("hello there", add_special_tokens=False)["input_ids"]
    whole_cut, whole = tokenize_sft(sft_examples(rows, "messages", completion_only=False), tokenizer, chat=True,
                                    spec=spec("x"), report=DataReport("x"))
    assert all(whole_cut["completion_mask"]) and whole_cut["input_ids"] == cut["input_ids"]
    assert whole["input_ids"][:len(whole_cut["input_ids"])] == whole_cut["input_ids"]
    assert tokenizer.decode(whole["input_ids"]).endswith("hello there<|im_end|>\n")
    with pytest.raises(DataError, match=r"sft.jsonl: row 2: 'finished' must be true or false"):
        validate_rows([rows[1], {**rows[1], "finished": 0}], SFT_FORMATS["messages"], "sft.jsonl")


def test_overlong_rows_are_truncated_or_dropped_and_counted(tokenizer):
    examples = [("short", "ok", True), ("x " * 200, "long answer " * 50, True), ("q", "long answer " * 50, True)]
    report = DataReport("x")
    kept = tokenize_sft(examples, tokenizer, chat=True, spec=spec("x", max_length=32), report=report)
    assert len(kept) == 2 and all(len(r["input_ids"]) <= 32 for r in kept)
    assert report.truncated == 2 and report.dropped == {"prompt alone fills max_length=32": 1}
    report = DataReport("x")
    kept = tokenize_sft(examples, tokenizer, chat=True, spec=spec("x", max_length=32, overlong="drop"), report=report)
    assert len(kept) == 1 and report.dropped == {"longer than max_length=32": 2}


def test_a_pair_whose_prompt_fills_max_length_is_dropped_not_truncated(tokenizer):
    """DPO truncates an overlong pair from its end, so a prompt that fills max_length leaves neither
    side a token: dropped and counted (TRL would drop it unreported); a long answer is truncated."""
    rows = [{"prompt": "x " * 200, "chosen": "good", "rejected": "bad"},
            {"prompt": "q", "chosen": "long answer " * 50, "rejected": "bad"},
            {"prompt": "q", "chosen": "good", "rejected": "bad"}]
    for chat in (True, False):
        report = DataReport("pairs")
        kept = preference_examples(rows, tokenizer, chat, spec("pairs", max_length=32), report)
        assert len(kept) == 2 and report.truncated == 1, chat
        assert report.dropped == {"prompt alone fills max_length=32": 1}, chat


def test_identical_pairs_are_dropped_and_strings_become_chat_turns(tokenizer):
    rows = [{"prompt": "p", "chosen": "same", "rejected": "same"}, {"prompt": "p", "chosen": "good", "rejected": "bad", "margin": 1.5}]
    report = DataReport("pairs")
    examples = preference_examples(rows, tokenizer, True, spec("pairs"), report)
    assert report.dropped == {"chosen identical to rejected": 1}
    assert examples == [{
        "prompt": [{"role": "user", "content": "p"}],
        "chosen": [{"role": "assistant", "content": "good"}],
        "rejected": [{"role": "assistant", "content": "bad"}],
        "margin": 1.5,
    }]


def test_conversational_data_needs_a_chat_template(tokenizer):
    bare = build_tokenizer()
    bare.chat_template = None
    with pytest.raises(DataError, match="has none; set model.chat_template"):
        use_chat_template(bare, spec("x"), conversational=True, source="x")
    assert use_chat_template(bare, spec("x"), conversational=False, source="x") is False
    assert use_chat_template(tokenizer, spec("x", chat_template="never"), conversational=False, source="x") is False


def test_a_separate_eval_file_is_validated_like_the_training_file(tmp_path):
    train = write_jsonl(tmp_path / "train.jsonl", [{"text": "a"}, {"text": "b"}])
    evals = write_jsonl(tmp_path / "eval.jsonl", [{"text": "c"}])
    kind, rows, held = load_split(spec(train, eval_path=str(evals)), SFT_FORMATS, seed=0)
    assert (kind, len(rows), held) == ("text", 2, [{"text": "c"}])
    wrong = write_jsonl(tmp_path / "wrong.jsonl", [{"prompt": "p"}])
    with pytest.raises(DataError, match="wrong.jsonl: found columns"):
        load_split(spec(train, eval_path=str(wrong)), SFT_FORMATS, seed=0)
