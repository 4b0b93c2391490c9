"""Which dtypes weights load in and compute runs in, and the combinations align refuses.

Two settings decide it: `model.dtype` (how weights are stored: float32, bfloat16, float16, auto)
and `train.precision` (autocast for compute: fp32, bf16, fp16, auto). On top of them:
- Trained heads (PPO's value head, a reward model's score layer) and LoRA adapters are float32
  master weights whatever the base's dtype: AdamW's lr-1e-5 steps are below bfloat16's resolution
  and float16's Adam state underflows. For the same reason `auto` loads the weights of full
  fine-tuning in float32 on every device (16-bit compute runs on them through autocast); an
  explicit `model.dtype=bfloat16` with full fine-tuning runs as asked (pure bfloat16 training,
  half the memory) with a warning that most small updates round away.
- fp16 compute scales the loss (a GradScaler) so small gradients do not flush to zero.
- With 16-bit weights, `fp32` means no autocast: frozen weights compute in their own dtype,
  trained adapters and heads in float32.

Refused before anything loads, in one line (check_precision):
- float16 weights that train themselves (full fine-tuning): their Adam updates underflow and the
  GradScaler cannot unscale float16 gradients; use float32 weights with fp16 compute, or LoRA;
- two different 16-bit formats (bfloat16 weights with fp16 compute, or the reverse);
- bfloat16 on a GPU without it (T4, V100).
"""

from __future__ import annotations

import logging

import torch

from align.config import ModelSpec
from align.errors import ConfigError

log = logging.getLogger("align")

PRECISIONS = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def gpu_has_bf16() -> bool:
    return torch.cuda.is_available() and torch.cuda.is_bf16_supported()


def weights_dtype(spec: ModelSpec, trained: bool = False) -> torch.dtype:
    """The dtype a model's weights load in: model.dtype, or for `auto`: float32 for weights that
    train (full fine-tuning: master weights under 16-bit autocast, as mixed precision keeps them),
    and for frozen weights float32 on a CPU, bfloat16 on GPUs that have it, float16 on others.

    Why float32 for trained weights: AdamW moves each weight by about lr per step, and lr 1e-5 is
    below half of bfloat16's spacing for any weight above ~0.004 in size, so the step rounds away.
    Measured on SmolLM2-135M-Instruct (three AdamW steps at lr 1e-5): 2.0% of the weights changed
    in bfloat16 (100% in float32) and the update's norm was 19% of float32's; on an H200, PPO full
    fine-tuning in bfloat16 weights moved the policy's KL 0.08 in an update where float32 master
    weights moved it 1.74 (bench/results/gpu.json)."""
    if spec.dtype != "auto":
        return getattr(torch, spec.dtype)
    if trained or not torch.cuda.is_available():
        return torch.float32
    return torch.bfloat16 if gpu_has_bf16() else torch.float16


def cpu_has_bf16() -> bool:
    """Whether this CPU multiplies bfloat16 matrices in hardware (AMX or AVX512-BF16): there, bf16
    autocast ran SmolLM2's forward+backward 1.9x faster than float32 (bench/dpo_vs_trl.py), as
    stock TRL's bf16 default does. ALIGN_CPU_BF16=0 keeps `auto` at fp32 on every CPU: the test
    suite sets it, so its pinned figures do not depend on the machine."""
    import os

    return os.environ.get("ALIGN_CPU_BF16", "1") != "0" and cpu_bf16_units()


def cpu_bf16_units() -> bool:
    """Whether this CPU has AMX or AVX512-BF16, whatever ALIGN_CPU_BF16 says."""
    try:
        return bool(torch.cpu._is_amx_tile_supported() or torch.cpu._is_avx512_bf16_supported())
    except AttributeError:  # a torch without these probes: assume no
        return False


def describe_cpu() -> str:
    """This CPU for a benchmark's record: its model name, core count and whether it has bf16 units."""
    import os
    import platform
    from pathlib import Path

    info = Path("/proc/cpuinfo")
    names = [line.split(":", 1)[1].strip() for line in info.read_text().splitlines()
             if line.startswith("model name")] if info.is_file() else []
    return f"{names[0] if names else platform.machine()}, {os.cpu_count()} cores, " + (
        "bf16 units (AMX or AVX512-BF16)" if cpu_bf16_units() else "no bf16 units")


def compute_dtype(precision: str) -> torch.dtype:
    """The compute dtype for autocast: what was asked, or the fastest correct one for this device:
    bf16 on GPUs and CPUs that have it, fp16 on other GPUs, fp32 on other CPUs."""
    if precision == "auto":
        if not torch.cuda.is_available():
            return torch.bfloat16 if cpu_has_bf16() else torch.float32
        return torch.bfloat16 if gpu_has_bf16() else torch.float16
    return PRECISIONS[precision]


def autocast(precision: str, device: torch.device):
    """A context that runs matmuls in the compute dtype (a no-op for fp32)."""
    dtype = compute_dtype(precision)
    return torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32)


def grad_scaler(precision: str, device: torch.device) -> torch.amp.GradScaler:
    """A loss scaler for fp16 compute (disabled, a pass-through, otherwise)."""
    return torch.amp.GradScaler(device.type, enabled=compute_dtype(precision) == torch.float16)


def check_precision(spec: ModelSpec, precision: str, *, trains_base: bool) -> None:
    """Refuse a dtype/precision combination that cannot train correctly, saying what to pass instead."""
    weights, compute = weights_dtype(spec, trained=trains_base), compute_dtype(precision)
    asked = f"model.dtype={spec.dtype} with train.precision={precision}"
    if torch.cuda.is_available() and not gpu_has_bf16() and torch.bfloat16 in (weights, compute):
        raise ConfigError(f"{asked}: this GPU has no bfloat16; use train.precision=fp16 and model.dtype=auto")
    if weights == torch.float16 and trains_base:
        raise ConfigError(
            f"{asked}: full fine-tuning cannot train float16 weights (their Adam updates underflow); use "
            "model.dtype=float32 with train.precision=fp16 (mixed precision, as model.dtype=auto does), or LoRA"
        )
    if len({weights, compute} - {torch.float32}) > 1:  # QLoRA too: its 4-bit layers compute in model.dtype
        raise ConfigError(
            f"{asked}: mixes bfloat16 and float16; pick one 16-bit format (train.precision="
            f"{'bf16' if weights == torch.bfloat16 else 'fp16'}) or model.dtype=float32"
        )


def check_stage_precision(config) -> None:
    """check_precision for a training stage's config (a no-op for stages that do not train)."""
    train, lora = getattr(config, "train", None), getattr(config, "lora", None)
    if train is None or lora is None:
        return
    check_precision(config.model, train.precision, trains_base=not lora.enabled)


def warn_pure_bfloat16(config) -> None:
    """Full fine-tuning in bfloat16 weights runs as asked but loses most small updates (see weights_dtype)."""
    lora = getattr(config, "lora", None)
    if getattr(config, "train", None) is not None and lora is not None and not lora.enabled and config.model.dtype == "bfloat16":
        log.warning("model.dtype=bfloat16 with full fine-tuning: AdamW steps smaller than bfloat16's spacing round "
                    "away (at lr 1e-5 only ~2% of SmolLM2's weights moved); model.dtype=auto or float32 keeps "
                    "float32 master weights under bf16 compute")
