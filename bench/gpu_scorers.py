"""Scorers for bench/gpu_check.py's random-weight models: a reward for speed runs on a model with no
reward model of its size (longer answers score higher), and an answer check for label-steps."""


def length(prompts, completions):
    return [len(c) / 100 for c in completions]


def ends_with_digit(prompts, completions, **columns):
    """label-steps' answer function: a solution 'reaches the answer' when it ends with a digit."""
    return [c.strip()[-1:].isdigit() for c in completions]
