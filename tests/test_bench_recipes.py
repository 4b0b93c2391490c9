"""The sentiment benchmark's recipes are valid align recipes (their stages, keys and values), so a
typo in bench/sentiment.py fails here, not an hour into a run."""

from __future__ import annotations

import sys

import pytest
import yaml

from conftest import ROOT


@pytest.mark.parametrize("plan", ["FULL", "QUICK"])
def test_sentiment_recipes_validate(align, tmp_path, monkeypatch, plan):
    sys.path.insert(0, str(ROOT / "bench"))
    try:
        import sentiment
    finally:
        sys.path.remove(str(ROOT / "bench"))
    chosen = getattr(sentiment, plan)
    recipe = sentiment.arms_recipe(chosen)
    (tmp_path / "arms.yaml").write_text(yaml.safe_dump(recipe, sort_keys=False), encoding="utf-8")
    monkeypatch.chdir(tmp_path)
    result = align("run", "arms.yaml", "--dry-run")
    assert result.code == 0, result.err
    names = [stage["name"] for stage in recipe["stages"]]
    for name in names:
        assert name in result.out
    assert sum(n.startswith("dpo-b") for n in names) == len(chosen.dpo_betas)
    assert sum(n.startswith("ppo-kl") for n in names) == len(chosen.ppo_kl_coefs)
    assert sum(n.startswith("rs-samples-") for n in names) == chosen.rs_rounds
