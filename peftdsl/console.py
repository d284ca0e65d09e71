"""What the commands share: exit statuses, usage errors, `--set` values, printing diagnostics.

Front-end safe (no torch): `cli` and the execution stages (`runner`, `lock`) both use it,
so dependencies point from the commands down, never back up to `cli`.
"""

from __future__ import annotations

import sys

EXIT_OK, EXIT_ERRORS, EXIT_USAGE = 0, 1, 2


from peftdsl.errors import (
    UsageError,  # a command used wrongly: exit 2, one line, no traceback
)


def parse_sets(sets: list[str]) -> tuple[tuple[str, float], ...]:
    """`--set p=v` values, as (name, number) pairs in the order given."""
    out = []
    for item in sets:
        name, sep, value = item.partition("=")
        try:
            if not sep or not name.strip():
                raise ValueError
            out.append((name.strip(), float(value)))
        except ValueError:
            raise UsageError(f"--set takes NAME=NUMBER, got `{item}`") from None
    return tuple(out)


def check_sets(recipe, sets) -> None:
    """Every `--set` (or API `params=`) names a param of the recipe."""
    params = {p.name for p in recipe.params}
    for name, _ in sets:
        if name not in params:
            raise UsageError(f"--set {name}=…: the recipe has no param `{name}`"
                             + (f" (params: {', '.join(sorted(params))})" if params else ""))


def print_diagnostics(diags, fmt: str = "full", color: bool = False, stream=None) -> None:
    from peftdsl import render

    stream = stream or sys.stderr
    if not diags and fmt in ("full", "concise", "github"):
        return
    text = render.RENDERERS[fmt](diags, color=color)
    if text:
        print(text.rstrip("\n"), file=stream)
    if fmt == "full":
        print(render.summary_line(diags, color=color), file=stream)
