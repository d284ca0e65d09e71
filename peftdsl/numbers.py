"""How numbers, sizes and counts are written for people: one place, so every message agrees."""

from __future__ import annotations


def show_number(value: object) -> str:
    """`2` for 2.0, `0.25` for 0.25, repr otherwise (exact, and parses back to the same float)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return repr(value)
    if float(value).is_integer() and abs(value) < 1e16:
        return str(int(value))
    return repr(float(value))


def show_point(params) -> str:
    """`lam=0.4, mu=1` for a grid point or a set of params (pairs or a mapping)."""
    items = params.items() if hasattr(params, "items") else params
    return ", ".join(f"{name}={value:g}" for name, value in items)


def show_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def show_flops(n: int) -> str:
    for unit, size in (("TFLOP", 1e12), ("GFLOP", 1e9), ("MFLOP", 1e6)):
        if n >= size:
            return f"{n / size:.1f} {unit}"
    return f"{n} FLOP"


def plural(n: int, word: str) -> str:
    return f"{n} {word}{'' if n == 1 else 's'}"
