"""The command line: `peftdsl lint | explain | schema | run | lock` (docs/recipes.md).

Exit status: 0 success, 1 the recipe has errors or a run failed on its inputs,
2 usage error. User errors are diagnostics, never tracebacks; anything else is
reported as an internal error. `lint`, `explain` and `schema` never import torch.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import signal
import sys
import threading
from pathlib import Path

from peftdsl import __version__
from peftdsl.console import (
    EXIT_ERRORS,
    EXIT_OK,
    EXIT_USAGE,
    UsageError,
    check_sets,
    parse_sets,
    print_diagnostics,
)
from peftdsl.numbers import plural

_MARKER = re.compile(r"^peftdsl\s*:", re.MULTILINE)


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    with _sigterm_as_interrupt():
        try:
            return args.handler(args)
        except UsageError as err:
            print(f"peftdsl: error: {err}", file=sys.stderr)
            return EXIT_USAGE
        except KeyboardInterrupt as err:
            return _interrupted(err)
        except Exception as err:  # noqa: BLE001 - the one place that turns bugs into a message
            return _internal_error(err)


@contextlib.contextmanager
def _sigterm_as_interrupt():
    """SIGTERM (`kill`, `docker stop`, a CI timeout) stops a command the way Ctrl-C does: as a
    KeyboardInterrupt, so every temporary file is removed on the way out and the exit says so.
    A second SIGTERM while that cleanup runs is ignored (SIGKILL still ends it at once)."""
    if threading.current_thread() is not threading.main_thread():
        yield  # only the main thread may set handlers; a caller there owns its signals
        return

    def stop(signum, frame):
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        raise KeyboardInterrupt("SIGTERM")

    previous = signal.signal(signal.SIGTERM, stop)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _interrupted(err: KeyboardInterrupt) -> int:
    """`peftdsl: interrupted …`, naming the outputs already in place; 130 for Ctrl-C, 143 for SIGTERM."""
    from peftdsl.errors import Interrupted

    name = err.signal if isinstance(err, Interrupted) else (str(err) or "SIGINT")
    message = f"peftdsl: interrupted ({name})"
    if isinstance(err, Interrupted):
        if err.written:
            shown = ", ".join(f"`{n}`" + (" (replaced the old one)" if n in err.replaced else "")
                              for n in err.written)
            message += f"; already written whole: {shown}; every other output was left as it was"
        else:
            message += "; no output was written or replaced"
    print(message, file=sys.stderr)
    return 128 + (signal.SIGTERM if name == "SIGTERM" else signal.SIGINT)


def _internal_error(err: BaseException) -> int:
    if os.environ.get("PEFTDSL_DEBUG"):
        raise err
    print(f"peftdsl: internal error: {type(err).__name__}: {err}\n"
          "this is a bug in peftdsl, not in your recipe; set PEFTDSL_DEBUG=1 for the traceback and "
          "please report it", file=sys.stderr)
    return EXIT_ERRORS


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="peftdsl", description="Compose PEFT adapters with arithmetic.")
    parser.add_argument("--version", action="version", version=f"peftdsl {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    lint = commands.add_parser("lint", help="check recipes without loading any weight")
    lint.add_argument("paths", nargs="+", type=Path, metavar="PATH", help="recipe files or folders")
    lint.add_argument("--format", choices=("full", "concise", "json", "github", "sarif"), default="full")
    lint.add_argument("--no-inputs", action="store_true", help="check with declared kinds/ranks only")
    lint.add_argument("--strict", action="store_true", help="fail on warnings too")
    lint.add_argument("--color", choices=("auto", "always", "never"), default="auto")
    lint.set_defaults(handler=cmd_lint)

    explain = commands.add_parser("explain", help="print the typed IR, canonical forms and plan")
    explain.add_argument("recipe", type=Path)
    explain.add_argument("--set", action="append", default=[], metavar="P=V", dest="sets")
    explain.add_argument("--no-inputs", action="store_true")
    explain.set_defaults(handler=cmd_explain)

    schema = commands.add_parser("schema", help="print the recipe's JSON Schema")
    schema.set_defaults(handler=cmd_schema)

    run = commands.add_parser("run", help="compile, execute, write outputs, evaluate")
    run.add_argument("recipe", type=Path)
    run.add_argument("--set", action="append", default=[], metavar="P=V", dest="sets")
    run.add_argument("--only", nargs="+", default=[], metavar="NAME")
    run.add_argument("--device", default="auto", type=_device, help="auto | cpu | cuda[:N]")
    run.add_argument("--force", action="store_true", help="replace existing outputs")
    run.add_argument("--no-memory-guard", action="store_true",
                     help="run even when the plan needs more memory than is free")
    run.add_argument("--no-eval", action="store_true")
    run.add_argument("--report", type=Path, default=None, metavar="DIR")
    run.add_argument("--executor", choices=("local", "ray"), default="local")
    run.add_argument("--address", default=None, help="Ray cluster address (with --executor ray)")
    run.add_argument("--locked", action="store_true", help="refuse adapters without sha256 pins")
    run.add_argument("--allow-pickle", action="store_true", help="read .bin weights with weights_only=True")
    run.add_argument("--quiet", action="store_true")
    run.set_defaults(handler=cmd_run)

    lock = commands.add_parser("lock", help="write sha256 pins into a recipe, keeping its layout")
    lock.add_argument("recipe", type=Path)
    lock.set_defaults(handler=cmd_lock)
    return parser


# ---------------------------------------------------------------- helpers


def _device(text: str) -> str:
    if not re.fullmatch(r"auto|cpu|cuda(:\d+)?", text):
        raise argparse.ArgumentTypeError(f"expected auto, cpu or cuda[:N], got {text!r}")
    return text


def find_recipes(paths: list[Path]) -> list[Path]:
    """Files as given; folders searched for *.yaml / *.yml that carry a `peftdsl:` key."""
    found: list[Path] = []
    for path in paths:
        if path.is_dir():
            for candidate in sorted([*path.rglob("*.yaml"), *path.rglob("*.yml")]):
                if any(part.startswith(".") for part in candidate.relative_to(path).parts):
                    continue
                try:
                    head = candidate.read_text(encoding="utf-8", errors="replace")
                except OSError:
                    continue
                if _MARKER.search(head):
                    found.append(candidate)
        elif path.exists():
            found.append(path)
        else:
            raise UsageError(f"no such file or folder: {path}")
    return found


def _use_color(choice: str) -> bool:
    if choice == "auto":
        return sys.stdout.isatty() and not os.environ.get("NO_COLOR")
    return choice == "always"


# ---------------------------------------------------------------- commands


def cmd_lint(args) -> int:
    from peftdsl.compiler import Options, analyse
    from peftdsl.diagnostics import Severity, Sink

    recipes = find_recipes(args.paths)
    options = Options(use_files=not args.no_inputs)
    diags, said_once = [], set()
    for path in recipes:
        sink = Sink(once=said_once)
        analyse(path, sink, options)
        diags.extend(sorted(sink.items, key=_position))
    machine = args.format in ("json", "sarif")
    print_diagnostics(diags, args.format, _use_color(args.color), stream=sys.stdout)
    if not diags and not machine:
        print(f"{plural(len(recipes), 'recipe')} checked, no problems", file=sys.stderr)
    failing = {Severity.ERROR, Severity.WARNING} if args.strict else {Severity.ERROR}
    return EXIT_ERRORS if any(d.level in failing for d in diags) else EXIT_OK


def _position(diag) -> tuple[int, int]:
    return (diag.span.start, diag.span.end) if diag.span else (-1, -1)


def cmd_explain(args) -> int:
    from peftdsl.compiler import Options, analyse
    from peftdsl.diagnostics import Sink
    from peftdsl.explain import explain

    if not args.recipe.is_file():
        raise UsageError(f"no such file: {args.recipe}")
    sets = parse_sets(args.sets)
    sink = Sink()
    analysis = analyse(args.recipe, sink, Options(use_files=not args.no_inputs, overrides=sets))
    if analysis is not None:
        check_sets(analysis.recipe, sets)
    print_diagnostics(sink.items, "full", _use_color("auto"))
    if analysis is None or sink.has_errors():
        return EXIT_ERRORS
    print(explain(analysis))
    return EXIT_OK


def cmd_schema(args) -> int:
    from peftdsl.schema import json_schema

    print(json.dumps(json_schema(), indent=2, sort_keys=True))
    return EXIT_OK


def cmd_run(args) -> int:
    import peftdsl
    from peftdsl.errors import RecipeError
    from peftdsl.runner import RunOptions

    recipe = peftdsl.load(args.recipe, params=dict(parse_sets(args.sets)), allow_pickle=args.allow_pickle)
    color = sys.stderr.isatty()
    options = RunOptions(only=tuple(args.only), device=args.device, force=args.force, no_eval=args.no_eval,
                         report=args.report, executor=args.executor, address=args.address, locked=args.locked,
                         quiet=args.quiet, memory_guard=not args.no_memory_guard, on_diagnostics=lambda diags: print_diagnostics(diags, "full", color))
    try:
        recipe.run_with(options)
    except RecipeError:
        return EXIT_ERRORS  # its diagnostics were printed as the run found them
    return EXIT_OK


def cmd_lock(args) -> int:
    if not args.recipe.is_file():
        raise UsageError(f"no such file: {args.recipe}")
    from peftdsl.lock import lock_command

    return lock_command(args.recipe)


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
