"""A reward for speed runs on a model with no reward model of its size: longer answers score higher."""


def length(prompts, completions):
    return [len(c) / 100 for c in completions]
