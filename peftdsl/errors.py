"""The exceptions peftdsl raises at its callers, one type per kind of failure.

`RecipeError` carries diagnostics (the recipe or its inputs are wrong: exit 1);
`UsageError` is a call or command used wrongly (exit 2); `InputDataError`,
`OutputError` and `EvalDataError` are user-facing failures found while running,
which the driver turns into diagnostics at the recipe position. Anything else that
escapes is a bug, and the CLI says so. None of these derive from ValueError or
KeyError, so a bug that raises those is never mistaken for bad input.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from peftdsl.diagnostics import Diagnostic


class PeftdslError(Exception):
    """Base of every exception peftdsl raises on purpose."""


class RecipeError(PeftdslError):
    """The recipe has errors; `str(err)` renders them as the CLI does (file:line:col, source, caret)."""

    def __init__(self, diagnostics: Sequence[Diagnostic]):
        self.diagnostics = list(diagnostics)
        super().__init__(self.rendered())

    def rendered(self, *, color: bool = False) -> str:
        from peftdsl.render import render_full, summary_line

        return render_full(self.diagnostics, color=color).rstrip("\n") + "\n" + summary_line(self.diagnostics)


class UsageError(PeftdslError):
    """An API call or command used wrongly (an unknown param, output or device): exit 2."""


class InputDataError(PeftdslError):
    """An input's tensor data is unusable (undecodable, NaN, Inf, a result that overflows)."""


class OutputError(PeftdslError):
    """An output cannot be written as asked (it exists, its path is unusable)."""


class EvalDataError(PeftdslError):
    """The evaluation data is unusable (missing field, unknown label, …)."""


class UntrainedWeights(PeftdslError):
    """The model class evaluation needs would get weights the checkpoint lacks (a missing head)."""

    def __init__(self, model_class: str, missing: Sequence[str], model: str = "base"):
        self.model_class, self.missing, self.model = model_class, list(missing), model
        shown = ", ".join(f"`{name}`" for name in self.missing[:4]) + (" …" if len(self.missing) > 4 else "")
        whose = "" if model == "base" else f"; `{model}` does not set them"
        super().__init__(f"loaded as {model_class}, the base would get {len(self.missing)} newly initialised "
                         f"weight(s) that its checkpoint lacks: {shown}{whose}")


class Interrupted(KeyboardInterrupt):
    """A run stopped by Ctrl-C or SIGTERM (`signal`), knowing which outputs it had put in place.

    A KeyboardInterrupt still, so every cleanup that handles Ctrl-C handles it too.
    `written` are complete on disk (`replaced` of them took the place of an older
    output); every other output was left as it was.
    """

    def __init__(self, signal: str = "SIGINT", written: Sequence[str] = (), replaced: Sequence[str] = ()):
        super().__init__(signal)
        self.signal, self.written, self.replaced = signal, tuple(written), tuple(replaced)


class InternalError(Exception):
    """A broken invariant inside peftdsl: a bug, never the user's input (so not a PeftdslError)."""
