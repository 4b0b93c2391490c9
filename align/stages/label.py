"""RLAIF preference labels: an AI judge decides which of two responses is better.

The label is soft: P(A better) read from the judge's next-token distribution over the answers.
Every pair is judged in both orders and the two probabilities averaged (Lee et al., RLAIF),
which removes the judge's preference for a position; the manifest reports how often the
preferred response survives the swap (position consistency). Output rows are ready for
`align rm` / `align dpo`: prompt, chosen, rejected, label_prob (the confidence), principle, and
chosen_finished/rejected_finished (false for a response cut at its length limit, which dpo trains
without an end of turn; carried over from --pairs rows that have them).

Rows are written as they are labelled (FILE.partial) with progress recorded after every batch,
so a run that dies (an unreachable judge server, a kill) keeps what it labelled and `--resume`
continues from there.
"""

from __future__ import annotations

import json
import logging
import time
from collections import Counter
from pathlib import Path

from tqdm.auto import tqdm

from align import distributed
from align.checkpoints import atomic_write_text, prepare_output_file, write_manifest
from align.chunked import PartialRows
from align.config import LabelConfig
from align.constitution import load_constitution
from align.data import last_text, load_split, prompts_to_sample
from align.generation import sample
from align.judge import load_judge
from align.engines import open_sampler
from align.models import context_length, load_tokenizer, resolve_model

log = logging.getLogger("align")

PAIR_FORMATS = {"preference": ("prompt", "chosen", "rejected"), "two responses": ("prompt", "response_a", "response_b")}


def run(config: LabelConfig) -> Path:
    out, started = Path(config.output), time.time()
    constitution = load_constitution(config.constitution) if config.constitution else None
    sidecar = out.with_name(out.name + ".pairs.json")  # sampled pairs, kept until the run finishes
    if not config.resume:
        prepare_output_file(out, overwrite=config.overwrite)
        if distributed.is_main():
            sidecar.unlink(missing_ok=True)
    pairs, skipped = _pairs(config, sidecar)
    judge = load_judge(config.judge)
    outputs = PartialRows({"prefs": out}, out.with_name(out.name + ".progress.json"), resume=config.resume)
    if outputs.done:
        log.info("label: resuming after pair %d of %d", outputs.done, len(pairs))

    step = config.judge.batch_size
    with tqdm(total=len(pairs), initial=outputs.done, desc="label", unit="pair", disable=not log.isEnabledFor(logging.INFO)) as bar:
        for start, end in outputs.fill(len(pairs), step, lambda start, end: _label(
                judge, pairs[start:end], range(start, end), config, constitution)):
            bar.update(end - start)
    outputs.finish()
    if distributed.is_main():
        sidecar.unlink(missing_ok=True)

    counts, judged = outputs.counts, len(pairs)
    metrics = {
        "pairs": judged, "kept": counts.get("kept", 0),
        "dropped_low_confidence": counts.get("low_confidence", 0), "ties": counts.get("ties", 0),
        "skipped_samples": skipped, "unreadable_answers": int(counts.get("unreadable", 0)),
        "mean_label_prob": counts.get("label_prob_sum", 0.0) / max(1, counts.get("kept", 0)),
        "first_position_rate": counts.get("first_preferred", 0) / max(1, counts.get("orders", 0)),
    }
    if config.swap:
        metrics["position_consistency"] = counts.get("consistent", 0) / max(1, judged)
    write_manifest(out, config=config, metrics=metrics, started=started, judge=judge.name)
    log.info("label: kept %d of %d pairs%s", metrics["kept"], judged,
             f", position consistency {metrics['position_consistency']:.0%}" if config.swap else "")
    return out


def _pairs(config: LabelConfig, sidecar: Path) -> tuple[list[dict], int]:
    """[{prompt, a, b}] from --pairs, or sampled from --policy (saved beside the output for --resume).

    Sampled pairs whose two responses are identical or empty are skipped and counted."""
    if config.pairs is not None:
        _, rows, _ = load_split(config.pairs, PAIR_FORMATS, 0)
        first, second = ("chosen", "rejected") if "chosen" in rows[0] else ("response_a", "response_b")
        return [{"prompt": r["prompt"], "a": last_text(r[first]), "b": last_text(r[second]),
                 "a_finished": r.get(f"{first}_finished", True), "b_finished": r.get(f"{second}_finished", True)} for r in rows], 0
    saved = None
    if distributed.is_main():  # the policy samples in one process; a multi-process run shares the judging
        if not (config.resume and sidecar.is_file()):
            with distributed.alone():
                _sample_pairs(config, sidecar)
        saved = json.loads(sidecar.read_text(encoding="utf-8"))
    saved = distributed.from_main(saved)
    return saved["pairs"], saved["skipped"]


def _sample_pairs(config: LabelConfig, sidecar: Path) -> None:
    """Sample --num-samples responses per prompt from --policy and save them in pairs beside the output."""
    source = resolve_model(config.model)
    tokenizer = load_tokenizer(config.model, source, padding_side="left")
    _, prompts, chat = prompts_to_sample(config.prompts, tokenizer, config.sampling.seed, context_length(config.model, source),
                                         config.sampling.max_new_tokens)
    with open_sampler(config.model, source, config.generation, config.sampling.seed) as model, tqdm(
            total=len(prompts) * config.sampling.num_samples, desc="sample pairs", unit="sample",
            disable=not log.isEnabledFor(logging.INFO)) as bar:
        samples = sample(model, tokenizer, prompts, config.sampling, chat, progress=bar.update)
    pairs, skipped = [], 0
    for prompt, completions in zip(prompts, samples):
        for a, b in zip(completions[0::2], completions[1::2]):
            if a.text.strip() == b.text.strip() or not a.text.strip() or not b.text.strip():
                skipped += 1  # nothing to compare, or a pair that rm/dpo would refuse
                continue
            pairs.append({"prompt": prompt, "a": a.text, "b": b.text, "a_finished": a.finished, "b_finished": b.finished})
    del model  # an hf policy's memory, before the judge loads
    atomic_write_text(sidecar, json.dumps({"pairs": pairs, "skipped": skipped}))


def _label(judge, pairs: list[dict], indices: range, config: LabelConfig, constitution) -> tuple[list[dict], Counter]:
    if constitution:
        principles = [constitution.draw(config.sampling.seed, "label", i) for i in indices]
        questions, names = [p.comparison for p in principles], [p.name for p in principles]
    else:
        questions, names = [config.question] * len(pairs), [None] * len(pairs)
    prompts, a, b = [p["prompt"] for p in pairs], [p["a"] for p in pairs], [p["b"] for p in pairs]
    unreadable = judge.unreadable
    a_first = judge.prefer_first(prompts, a, b, questions)  # P(A) with A shown first
    counts = Counter(first_preferred=int((a_first > 0.5).sum()), orders=len(pairs))
    if config.swap:
        b_first = judge.prefer_first(prompts, b, a, questions)  # P(B) with B shown first
        prob_a = (a_first + (1 - b_first)) / 2
        consistent = (a_first > 0.5) == (b_first < 0.5)
        counts.update(consistent=int(consistent.sum()), orders=len(pairs), first_preferred=int((b_first > 0.5).sum()))
    else:
        prob_a, consistent = a_first, None
    counts["unreadable"] = judge.unreadable - unreadable  # this chunk's, kept with the others' (and on resume)
    rows = []
    for n, pair in enumerate(pairs):
        p = float(prob_a[n])
        confidence = max(p, 1 - p)
        if abs(p - 0.5) < 1e-6:
            counts["ties"] += 1
            continue
        if confidence < config.min_confidence:
            counts["low_confidence"] += 1
            continue
        chosen, rejected = ("a", "b") if p > 0.5 else ("b", "a")
        row = {"prompt": pair["prompt"], "chosen": pair[chosen], "rejected": pair[rejected], "label_prob": round(confidence, 6),
               "principle": names[n], "chosen_finished": pair.get(f"{chosen}_finished", True),
               "rejected_finished": pair.get(f"{rejected}_finished", True)}
        if consistent is not None:
            row["position_consistent"] = bool(consistent[n])
        rows.append(row)
        counts["kept"] += 1
        counts["label_prob_sum"] += confidence
    return {"prefs": rows}, counts
