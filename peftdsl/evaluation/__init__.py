"""The evaluation wing: compositions patched into a loaded model, scored, swept and reported."""
