"""RLOO (TRL's RLOOTrainer): each completion's baseline is the mean reward of the others for its prompt."""

from pathlib import Path

from align.config import RLOOConfig
from align.online import run_online


def run(config: RLOOConfig) -> Path:
    from trl import RLOOConfig as TRLRLOOConfig, RLOOTrainer

    return run_online(config, RLOOTrainer, TRLRLOOConfig)
