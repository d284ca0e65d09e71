"""Progress bars for long steps: one implementation for computing, writing and evaluating.

A bar is drawn on stderr only when it is a terminal and the run is not quiet; logs and
CI get the final table, not redraws. Rich is imported only when a bar is drawn.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager


@contextmanager
def progress(description: str, total: int, *, quiet: bool) -> Iterator[Callable[[int], None]]:
    """A transient bar over `total` steps; yields `advance(n)` (a no-op when no bar is drawn)."""
    if quiet or not sys.stderr.isatty():
        yield lambda n: None
        return
    from rich.console import Console
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
    )

    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    with Progress(*columns, console=Console(stderr=True), transient=True) as bar:
        task = bar.add_task(description, total=total)
        yield lambda n: bar.advance(task, n)
