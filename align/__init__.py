"""align: SFT, reward models, PPO, DPO and RLAIF for language models, from one recipe."""

__version__ = "0.1.0"
