"""Constitutions: written principles that guide critique, revision and AI preference labels.

A constitution is a YAML file (or a built-in name, see `align constitutions`):

```yaml
name: harmless-helpful
rating: How helpful and harmless is the response? Rate it from 1 to 10.   # for --reward-judge
principles:
  - name: honesty
    critique: Identify any claims in the response that are false.          # align critique
    revision: Rewrite the response so it only states what is true.          # align critique
    comparison: Which response is more honest?                              # align label
    examples:                                                               # optional few-shot
      - {prompt: ..., response: ..., critique: ..., revision: ...}
```
"""

from __future__ import annotations

import random
from pathlib import Path

from pydantic import Field, model_validator

from align.config import Closed
from align.config_files import read_yaml
from align.validation import build_config
from align.errors import ConfigError

BUILTIN_DIR = Path(__file__).parent / "constitutions"
DEFAULT = "harmless-helpful"


class Example(Closed):
    """A worked critique and revision, shown to the model before its own turn."""

    prompt: str = Field(min_length=1)
    response: str = Field(min_length=1)
    critique: str = Field(min_length=1)
    revision: str = Field(min_length=1)


class Principle(Closed):
    name: str = Field(min_length=1)
    critique: str = Field(min_length=1, description="asks the model to criticise its answer under this principle")
    revision: str = Field(min_length=1, description="asks the model to rewrite its answer to fix the critique")
    comparison: str = Field(min_length=1, description="the question a judge answers with A or B")
    examples: list[Example] = Field(default_factory=list)


class Constitution(Closed):
    name: str = Field(min_length=1)
    description: str = ""
    rating: str | None = Field(None, description="the question a judge answers with a score from 1 to 10")
    comparison: str | None = Field(None, description="the overall question a judge answers with A or B (eval)")
    principles: list[Principle] = Field(min_length=1)

    @model_validator(mode="after")
    def _unique_names(self) -> Constitution:
        names = [p.name for p in self.principles]
        duplicated = sorted({n for n in names if names.count(n) > 1})
        if duplicated:
            raise ValueError(f"principle name {duplicated[0]!r} is used twice; give each principle its own name")
        return self

    def draw(self, seed: int, *key: object) -> Principle:
        """The principle for one (prompt, sample, round): seeded, and independent of batching and resume."""
        return random.Random(":".join(map(str, (seed, *key)))).choice(self.principles)

    def rating_question(self) -> str:
        if self.rating:
            return self.rating
        return f"How well does the response follow these principles: {self._names()}? Rate it from 1 (not at all) to 10 (fully)."

    def comparison_question(self) -> str:
        return self.comparison or f"Which response better follows these principles: {self._names()}?"

    def _names(self) -> str:
        return ", ".join(p.name for p in self.principles)


def builtin_names() -> list[str]:
    return sorted(p.stem for p in BUILTIN_DIR.glob("*.yaml"))


def constitution_path(name_or_path: str) -> Path:
    """A built-in constitution's file, or the path as given."""
    if name_or_path in builtin_names():
        return BUILTIN_DIR / f"{name_or_path}.yaml"
    path = Path(name_or_path)
    if not path.is_file():
        raise ConfigError(
            f"constitution {name_or_path!r}: no such file or built-in; built-ins are {', '.join(builtin_names())}"
        )
    return path


def load_constitution(name_or_path: str) -> Constitution:
    path = constitution_path(name_or_path)
    return build_config(Constitution, read_yaml(path), f"constitution {path}")  # type: ignore[return-value]
