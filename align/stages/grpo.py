"""GRPO (TRL's GRPOTrainer): rewards normalised within each prompt's group of generations."""

from pathlib import Path

from align.config import GRPOConfig
from align.online import run_online


def run(config: GRPOConfig) -> Path:
    from trl import GRPOConfig as TRLGRPOConfig, GRPOTrainer

    return run_online(config, GRPOTrainer, TRLGRPOConfig, loss_type=config.loss_type,
                      importance_sampling_level=config.importance_sampling, scale_rewards=config.scale_rewards)
