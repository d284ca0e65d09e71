"""LoraHub at toy scale: run `lorahub.yaml` through peftdsl and write docs/lorahub.md.

    python recipes/demo/lorahub.py [--executor ray]

The report goes to a temporary folder; the learned adapter to out/lorahub/ (git ignores out/).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
PAGE = HERE.parents[1] / "docs" / "lorahub.md"

ROWS = [  # (model, what it is)
    ("base", "the base model, no adapter"),
    ("sentiment", "single adapter: sentiment, movies/food/travel/books"),
    ("sent_movies", "single adapter: sentiment, movies only"),
    ("lm_games", "single adapter: language model on games reviews (no labels)"),
    ("topic", "single adapter: topic classification"),
    ("uniform", "uniform average, exact: Σ 0.25·ΔWᵢ"),
    ("uniform_pem", "uniform average, LoraHub's rule: pem (A and B averaged)"),
    ("learned", "learned weights, exact: Σ wᵢ·ΔWᵢ"),
    ("learned_pem", "learned weights, LoraHub's rule: pem(Σ wᵢ·(Aᵢ, Bᵢ))"),
]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--executor", default="local", choices=("local", "ray"))
    parser.add_argument("--no-page", action="store_true", help="measure only; leave docs/lorahub.md alone")
    args = parser.parse_args(argv)
    import peftdsl

    with tempfile.TemporaryDirectory() as report:
        started = time.perf_counter()
        result = peftdsl.load(HERE / "lorahub.yaml").run(report=Path(report), quiet=True, force=True,
                                                         executor=args.executor)
        seconds = time.perf_counter() - started
        document = json.loads((Path(report) / "report.json").read_text())
    outcome = result.search
    test = {r["model"]: r["value"] for r in document["results"] if r["eval"] == "test"}
    fewshot_start = outcome.candidates[0] if outcome.candidates else None
    print(f"run {seconds:.1f} s ({args.executor}); search: {len(outcome.candidates)} candidates in "
          f"{outcome.seconds:.1f} s = {len(outcome.candidates) / outcome.seconds:.2f} candidates/s; composing "
          f"{outcome.compose_seconds:.2f} s, evaluating {outcome.eval_seconds:.2f} s (local executor only)")
    for model, _ in ROWS:
        print(f"  {model:12s} {test[model]:.4f}")
    if not args.no_page:
        PAGE.write_text(page(document, test, outcome, fewshot_start), encoding="utf-8")
        print(f"wrote {PAGE}")
    return 0


def page(document: dict, test: dict, outcome, first) -> str:
    best = document["search"]["best"]
    best_single = max(("sentiment", "sent_movies", "lm_games", "topic"), key=test.get)
    candidate = outcome.best_candidate
    lines = [
        "# LoraHub at toy scale",
        "",
        "Written by `python recipes/demo/lorahub.py`, which runs",
        "[`recipes/demo/lorahub.yaml`](../recipes/demo/lorahub.yaml) through `peftdsl run`; do not edit by hand.",
        "",
        "LoraHub (Huang et al., 2023) composes upstream LoRA modules for a task none of them was",
        "trained on, with weights learned gradient-free on a few examples. Here, on the demo model",
        "([recipes/demo/README.md](../recipes/demo/README.md)): four upstream adapters (`sentiment`,",
        "`sent_movies`, `lm_games`, `topic`), and the unseen task is the **sentiment of games",
        "reviews** (games are held out of the base corpus and of every sentiment adapter's data).",
        "The weights are searched (`optimizer: ngopt`, budget 40, seed 42, bounds [-1.5, 1.5], L1",
        "penalty 0.05·mean|wᵢ|, LoraHub's) to maximise accuracy on **32 examples**",
        "(`lorahub_fewshot.jsonl`, from the games validation split); the verdict is accuracy on",
        "**300 held-out examples** (`data/sentiment_games_test.jsonl`).",
        "",
        "| model | what | held-out accuracy |",
        "|---|---|---|",
    ]
    lines += [f"| `{m}` | {what} | {test[m]:.3f} |" for m, what in ROWS]
    lines += [
        "",
        (f"Learned weights: {', '.join(f'{k} = {v:.3f}' for k, v in best.items())} "
        f"(w1 sentiment, w2 sent_movies, w3 lm_games, w4 topic), found at step {candidate.step} of "
        f"{len(outcome.candidates)}; few-shot accuracy {candidate.value:.3f} there, against "
        f"{first.value:.3f} for the first candidate."),
        "",
        "## Verdict",
        "",
        (f"- Learned weights against the uniform average (exact sum): {test['learned']:.3f} vs "
        f"{test['uniform']:.3f} — {_beats(test['learned'], test['uniform'])}."),
        (f"- Learned weights against LoraHub's own rule at uniform weights (`pem`): {test['learned']:.3f} vs "
        f"{test['uniform_pem']:.3f} — {_beats(test['learned'], test['uniform_pem'])}; "
        f"LoraHub's rule at the learned weights gives {test['learned_pem']:.3f}."),
        (f"- Against the best single adapter (`{best_single}`, {test[best_single]:.3f}): "
        f"{_beats(test['learned'], test[best_single])}."),
        "",
        "At this scale, 32 examples make the few-shot accuracy coarse (steps of 1/32) and the",
        "search can overfit them: a few-shot gain need not carry over to held-out data.",
    ]
    if test[best_single] >= test["learned"]:
        lines += [f"Here a single adapter (`{best_single}`) is as good as or better than the learned composition."]
    if test["learned"] > max(test["uniform"], test["uniform_pem"]):
        lines += ["The learned weights do beat both uniform averages, which give the adapters that do not",
                  "help the task as much weight as those that do."]
    lines += ["The numbers are for this toy setting only.", ""]
    return "\n".join(lines)


def _beats(a: float, b: float) -> str:
    if a > b:
        return f"learned is better by {a - b:.3f}"
    if a < b:
        return f"learned is **worse** by {b - a:.3f}"
    return "a tie"


if __name__ == "__main__":
    sys.exit(main())
