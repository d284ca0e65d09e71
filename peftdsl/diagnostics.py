"""Diagnostics: user errors as data, with stable codes, collected in a sink.

Checks append to a `Sink` and keep going, so one run reports every error; a stage
boundary stops the pipeline when the sink holds an error (`Sink.raise_if_errors`).
Exceptions are for bugs, and for that one controlled stop (`CompileError`).
"""

from __future__ import annotations

import enum
import re
from dataclasses import dataclass, field

from peftdsl.spans import Span


class Severity(enum.Enum):
    ERROR = "error"
    WARNING = "warning"
    NOTE = "note"


@dataclass(frozen=True, slots=True)
class Code:
    """A stable diagnostic code: `T401` is `mixed-adapter-kinds` forever."""

    id: str
    name: str
    severity: Severity
    summary: str


def _codes(*rows: tuple[str, str, Severity, str]) -> dict[str, Code]:
    return {row[0]: Code(*row) for row in rows}


E, W, N = Severity.ERROR, Severity.WARNING, Severity.NOTE

# The registry. Every code has an entry in docs/diagnostics.md (a test checks it).
CODES: dict[str, Code] = _codes(
    # Y: the recipe file as YAML and its schema.
    ("Y001", "invalid-yaml", E, "the file is not valid YAML"),
    ("Y002", "duplicate-key", E, "a mapping has the same key twice"),
    ("Y003", "unknown-key", E, "a key that the recipe format does not define"),
    ("Y004", "wrong-value-type", E, "a value of the wrong type or out of range"),
    ("Y005", "missing-key", E, "a required key is absent"),
    ("Y006", "unsupported-version", E, "the `peftdsl:` format version is not one this release reads"),
    ("Y007", "yaml-too-complex", E, "aliases, tags or sizes the recipe loader refuses"),
    ("Y008", "invalid-name", E, "a name does not match [A-Za-z_][A-Za-z0-9_]*"),
    ("Y009", "not-a-recipe", E, "the file is not a peftdsl recipe"),
    # S: expression syntax.
    ("S101", "expression-syntax", E, "an expression does not parse"),
    ("S102", "expression-too-deep", E, "an expression nests deeper than the compiler allows"),
    # N: names.
    ("N201", "undefined-name", E, "a name that no adapter, param or composition defines"),
    ("N202", "forward-reference", E, "a composition uses one defined after it"),
    ("N203", "self-reference", E, "a composition uses itself"),
    ("N204", "duplicate-name", E, "a name defined twice across adapters, params and compose"),
    ("N205", "reserved-name", E, "`base` and function names cannot be defined"),
    ("N206", "unknown-output", E, "an output names no composition or adapter"),
    ("N207", "unknown-function", E, "a call to a function peftdsl does not define"),
    ("N208", "unused-source", W, "an adapter or param that nothing uses"),
    ("N209", "unknown-model", E, "an eval entry names a model that is not defined"),
    ("N210", "output-overwrites-input", E, "an output path that is, holds or lies inside an input or another output"),
    ("N211", "duplicate-eval", E, "two eval entries with the same name"),
    # I: inputs (adapter folders, base model) read without tensor data.
    ("I301", "missing-input", E, "an adapter or base path that does not exist"),
    ("I302", "bad-adapter-config", E, "`adapter_config.json` is missing or malformed"),
    ("I303", "unsupported-adapter", E, "a PEFT type or variant that peftdsl cannot compose exactly"),
    ("I304", "bad-weights", E, "a weights file that cannot be read or disagrees with its config"),
    ("I305", "declaration-mismatch", E, "a declared `kind` or `rank` disagrees with the adapter's files"),
    ("I306", "base-model-mismatch", W, "adapters name different base models"),
    ("I307", "shape-mismatch", E, "module shapes disagree between adapters or with `base`"),
    ("I308", "undeclared-input", W, "with --no-inputs, an adapter without a declared `kind`"),
    ("I309", "checksum-mismatch", E, "an adapter's sha256 differs from its pin"),
    ("I310", "pickled-weights", E, "weights stored as a pickle, refused without --allow-pickle"),
    ("I311", "unpinned-source", E, "with --locked, an adapter without a sha256 pin"),
    ("I313", "tied-embedding-delta", W, "a delta on an embedding the base ties to its output layer"),
    ("I312", "link-outside-adapter", E, "an adapter's file is a symlink to a file outside its folder"),
    # T: types and operators.
    ("T401", "mixed-adapter-kinds", E, "adapters of different kinds added together"),
    ("T402", "nonlinear-operation", E, "an operation that is not linear in the adapters"),
    ("T403", "dense-adapter-output", E, "a dense delta written as an adapter"),
    ("T404", "rank-mismatch", E, "`pem` or `peft_linear` over modules of unequal rank"),
    ("T405", "feedforward-mismatch", E, "(IA)³ terms disagree on a module's feed-forward flag"),
    ("T406", "bad-argument", E, "a function argument that is missing, unknown or invalid"),
    ("T407", "division-by-zero", E, "a division by a scalar that is zero"),
    ("T408", "non-finite-number", E, "a scalar that is infinite or NaN"),
    ("T409", "term-cancelled", W, "a term of a sum cancels out"),
    ("T410", "everything-cancelled", W, "a whole expression cancels to nothing"),
    ("T411", "pem-not-delta-sum", N, "`pem` is parameter-space arithmetic, not a sum of weight deltas"),
    ("T412", "scalar-composition", E, "a composition whose value is a number, not an adapter"),
    ("T413", "wrong-argument-kind", E, "a function applied to a kind it does not take"),
    ("T414", "part-not-composable", E, "a saved module, bias or token row a composition cannot set"),
    ("T415", "tensors-dropped", W, "LoRA extraction drops a full fine-tune's tensors that LoRA cannot hold"),
    ("T416", "embedding-extraction-combined", E, "`svd(…, embed=true)` is combined further instead of used whole"),
    # E: evaluation and sweeps.
    ("E501", "bad-eval", E, "an eval entry that cannot run as written"),
    ("E502", "bad-sweep", E, "a sweep that cannot run as written"),
    ("E503", "bad-search", E, "a search that cannot run as written"),
    ("E504", "search-extra-missing", E, "a search whose optimiser library is not installed"),
    # R: running.
    ("R601", "run-failed", E, "executing the plan failed on its inputs"),
    ("R602", "output-exists", E, "an output already exists and --force was not given"),
    ("R603", "out-of-memory", E, "the plan does not fit in memory"),
)

_IGNORE = re.compile(r"#\s*peftdsl:\s*ignore\[([A-Z0-9,\s]+)\]")


@dataclass(frozen=True, slots=True)
class Label:
    """A secondary span with a short message (`chat` is a LoRA adapter)."""

    span: Span
    message: str


@dataclass(frozen=True, slots=True)
class Diagnostic:
    code: str
    message: str
    span: Span | None = None
    label: str = ""
    labels: tuple[Label, ...] = ()
    help: str = ""
    notes: tuple[str, ...] = ()
    severity: Severity | None = None  # given as None: the code's default severity

    def __post_init__(self) -> None:
        if self.severity is None:
            object.__setattr__(self, "severity", CODES[self.code].severity)

    @property
    def level(self) -> Severity:
        return self.severity

    @property
    def name(self) -> str:
        return CODES[self.code].name

    def is_ignored(self) -> bool:
        """True when the line of the primary span says `# peftdsl: ignore[CODE]`."""
        if self.span is None:
            return False
        line, _ = self.span.source.line_col(self.span.start)
        match = _IGNORE.search(self.span.source.line_text(line))
        return bool(match) and self.code in re.split(r"[,\s]+", match.group(1))


@dataclass
class Sink:
    """Collects diagnostics in the order they were found."""

    items: list[Diagnostic] = field(default_factory=list)
    # Codes already emitted by `emit_once`; lint shares one set across recipes, so a
    # note like T411 is said once per run, not once per file.
    once: set[str] = field(default_factory=set)

    def emit(self, code: str, message: str, span: Span | None = None, **kw) -> None:
        assert code in CODES, code
        diag = Diagnostic(code, message, span, **kw)
        # An ignore comment silences warnings and notes; an error would only resurface,
        # worse, when `run` trips over what it describes.
        if diag.level is Severity.ERROR or not diag.is_ignored():
            self.items.append(diag)

    def emit_once(self, code: str, message: str, span: Span | None = None, **kw) -> None:
        """Emit a code at most once per sink (for notes like T411)."""
        if code not in self.once:
            self.once.add(code)
            self.emit(code, message, span, **kw)

    @property
    def errors(self) -> list[Diagnostic]:
        return [d for d in self.items if d.level is Severity.ERROR]

    @property
    def warnings(self) -> list[Diagnostic]:
        return [d for d in self.items if d.level is Severity.WARNING]

    def has_errors(self) -> bool:
        return any(d.level is Severity.ERROR for d in self.items)
