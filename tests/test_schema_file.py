"""The committed `peftdsl.schema.json` (which shipped recipes point editors at) is current."""

from __future__ import annotations

import json
from pathlib import Path

from peftdsl.schema import json_schema

ROOT = Path(__file__).resolve().parents[1]


def test_committed_schema_matches_the_model():
    committed = json.loads((ROOT / "peftdsl.schema.json").read_text())
    assert committed == json_schema(), "regenerate with: peftdsl schema > peftdsl.schema.json"


def test_shipped_recipes_point_at_the_schema():
    recipes = sorted((ROOT / "recipes").rglob("*.yaml"))
    assert recipes
    for recipe in recipes:
        first = recipe.read_text().splitlines()[0]
        assert first.startswith("# yaml-language-server: $schema="), recipe
        target = (recipe.parent / first.split("$schema=", 1)[1].strip()).resolve()
        assert target == ROOT / "peftdsl.schema.json", recipe
