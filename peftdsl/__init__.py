"""peftdsl: compose PEFT adapters with arithmetic, declared in versioned recipes.

    import peftdsl
    recipe = peftdsl.load("recipe.yaml")
    recipe.compose("mix").save("out/mix")

The public names are those in `__all__` (docs/api.md); everything else is internal.
Importing peftdsl, and `load`, never import torch: execution does, when it starts.
"""

__version__ = "0.1.0"

from peftdsl.api import Composition, Recipe, load, loads  # noqa: E402
from peftdsl.diagnostics import Diagnostic, Severity  # noqa: E402
from peftdsl.errors import PeftdslError, RecipeError, UsageError  # noqa: E402
from peftdsl.runner import RunOptions, RunResult  # noqa: E402

__all__ = [
    "Composition",
    "Diagnostic",
    "PeftdslError",
    "Recipe",
    "RecipeError",
    "RunOptions",
    "RunResult",
    "Severity",
    "UsageError",
    "__version__",
    "load",
    "loads",
]
