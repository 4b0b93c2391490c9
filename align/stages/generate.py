"""Sample completions from any checkpoint into a JSONL file (one row per sample)."""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

from tqdm.auto import tqdm

from align import distributed
from align.checkpoints import atomic_write_text, prepare_output_file, write_manifest
from align.config import GenerateConfig
from align.data import prompts_to_sample
from align.generation import my_share, sample
from align.engines import open_sampler
from align.models import context_length, load_tokenizer, resolve_model

log = logging.getLogger("align")


def run(config: GenerateConfig) -> Path:
    out = Path(config.output)
    started = time.time()
    source = resolve_model(config.model)
    tokenizer = load_tokenizer(config.model, source, padding_side="left")
    _, prompts, chat = prompts_to_sample(config.prompts, tokenizer, config.sampling.seed, context_length(config.model, source),
                                         config.sampling.max_new_tokens)
    prepare_output_file(out, overwrite=config.overwrite or config.resume)
    total = len(prompts) * config.sampling.num_samples
    # A multi-process run shares the batches out (each process its own copy of the model); the bar counts this one's.
    with open_sampler(config.model, source, config.generation, config.sampling.seed) as model, tqdm(
            total=my_share(total, config.sampling.batch_size), desc="generate", unit="sample",
            disable=not log.isEnabledFor(logging.INFO)) as bar:
        completions = sample(model, tokenizer, prompts, config.sampling, chat, progress=bar.update,
                             shared=distributed.launched())
    lines = [
        json.dumps({"prompt": prompt, "completion": c.text, "sample": k, "finished": c.finished, "tokens": len(c.token_ids)})
        for prompt, samples in zip(prompts, completions)
        for k, c in enumerate(samples)
    ]
    # Written whole or not at all; the manifest beside it (FILE.align.json) comes last.
    if distributed.is_main():
        atomic_write_text(out, "\n".join(lines) + "\n")
    finished = sum(c.finished for samples in completions for c in samples)
    write_manifest(
        out, config=config, started=started,
        metrics={
            "samples": total,
            "eos_rate": finished / total,
            "mean_tokens": sum(len(c.token_ids) for s in completions for c in s) / total,
        },
    )
    log.info("generate: wrote %d samples to %s (%.0f%% ended with EOS)", total, out, 100 * finished / total)
    return out

