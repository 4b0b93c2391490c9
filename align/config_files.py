"""Config files and overrides: strict YAML reading, `--set KEY=VALUE`, and merging blocks."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from align.errors import ConfigError


class _StrictLoader(yaml.SafeLoader):
    """The safe loader (no python objects), refusing a key given twice in one mapping: plain YAML
    keeps the last one silently, so `train:` written twice would drop the first block. Merge keys
    (`<<: *shared`) work as in YAML: a key written beside one overrides the merged value."""

    def construct_mapping(self, node, deep=False):
        seen: set = set()
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                continue
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"{key!r} twice in one mapping; keep one", key_node.start_mark
                )
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


def read_yaml(path: Path) -> dict[str, Any]:
    """Read a YAML mapping with the safe loader; one-line errors for every way it can fail."""
    if not path.is_file():
        raise ConfigError(f"{path}: config file not found")
    try:
        loaded = yaml.load(path.read_text(encoding="utf-8"), Loader=_StrictLoader)
    except UnicodeDecodeError:
        raise ConfigError(f"{path}: not UTF-8 text; save the recipe as UTF-8") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark else ""
        problem = getattr(exc, "problem", None) or "invalid YAML"
        raise ConfigError(f"{path}: invalid YAML{where}: {problem}") from None
    if not isinstance(loaded, dict):
        raise ConfigError(f"{path}: expected a mapping of keys at the top level, got {type(loaded).__name__}")
    return loaded


def parse_override(text: str) -> tuple[list[str], Any]:
    """`a.b.c=value` -> (["a", "b", "c"], value), with the value read as a YAML scalar."""
    key, sep, value = text.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"--set {text!r}: expected KEY=VALUE, e.g. --set train.learning_rate=1e-4")
    try:
        parsed = yaml.safe_load(value) if value.strip() else ""
    except yaml.YAMLError:
        parsed = value
    if isinstance(parsed, str):
        # YAML 1.1 reads 1e-4 as a string; people mean the number.
        try:
            parsed = float(parsed)
        except ValueError:
            pass
    return key.strip().split("."), parsed


def set_path(target: dict[str, Any], path: list[str], value: Any) -> None:
    """Set `target[path[0]][path[1]]... = value`, creating blocks; shorthands become blocks."""
    for part in path[:-1]:
        child = target.get(part)
        child = _expand(child) if isinstance(child, (dict, str, bool)) else {}
        target[part] = child
        target = child
    target[path[-1]] = value


def deep_merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    """A new dict: `extra` over `base`, merging nested blocks (shorthands expanded)."""
    merged = dict(base)
    for key, value in extra.items():
        old = merged.get(key)
        if isinstance(value, dict) and isinstance(old, (dict, str, bool)):
            merged[key] = deep_merge(_expand(old), value)
        elif isinstance(old, dict) and isinstance(value, (str, bool)):
            merged[key] = deep_merge(old, _expand(value))
        else:
            merged[key] = value
    return merged


def _expand(value: dict | str | bool) -> dict[str, Any]:
    """`model: NAME` means `model: {path: NAME}`; `lora: false` means `lora: {enabled: false}`."""
    if isinstance(value, dict):
        return dict(value)
    if isinstance(value, bool):
        return {"enabled": value}
    return {"path": value}
