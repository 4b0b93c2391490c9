"""Host memory: freed tensor memory stays in the process for the next step to reuse."""

import os
import subprocess
import sys
import textwrap

import pytest

PROBE = textwrap.dedent("""
    import torch
    from align.memory import keep_freed_memory

    def resident():
        return int(open("/proc/self/statm").read().split()[1]) * 4096

    tuned = keep_freed_memory()
    activations = torch.ones(64 * 2**20 // 4)  # 64 MiB, over glibc's default mmap threshold
    before = resident()
    del activations
    print(tuned, (before - resident()) / 2**20)
""")


def freed_mib(env: dict) -> tuple[str, float]:
    result = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, env=env, check=True)
    tuned, freed = result.stdout.split()
    return tuned, float(freed)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc")
def test_freed_tensor_memory_is_kept_unless_switched_off():
    tuned, freed = freed_mib(dict(os.environ, ALIGN_KEEP_FREED_MEMORY="1"))
    assert tuned == "True" and freed < 8, freed  # kept in the heap for the next tensor
    tuned, freed = freed_mib(dict(os.environ, ALIGN_KEEP_FREED_MEMORY="0"))
    assert tuned == "False" and freed > 48, freed  # malloc's default: handed back to the kernel at once
