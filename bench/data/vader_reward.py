"""The sentiment benchmark's gold reward: VADER's compound score (-1..1) of each completion.

Used as an align reward function: `--reward-fn bench/data/vader_reward.py:positive`.
"""

from __future__ import annotations

from functools import cache


@cache
def _analyzer():
    from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer

    return SentimentIntensityAnalyzer()


def score(text: str) -> float:
    return _analyzer().polarity_scores(text)["compound"]


def positive(prompts: list, completions: list[str]) -> list[float]:
    """How positive each continuation reads, by VADER's compound score."""
    return [score(text) for text in completions]
