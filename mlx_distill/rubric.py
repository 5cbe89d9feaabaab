"""The reference run's five quality dimensions (0-10), shared by the judge, scores and charts."""

from __future__ import annotations

# (key, label) in the reference run's order.
DIMENSIONS: tuple[tuple[str, str], ...] = (
    ("correctness", "Code Correctness"),
    ("structure", "Structure & Design"),
    ("documentation", "Documentation"),
    ("error_handling", "Error Handling"),
    ("completeness", "Completeness"),
)
DIMENSION_KEYS: tuple[str, ...] = tuple(k for k, _ in DIMENSIONS)
LABELS: dict[str, str] = dict(DIMENSIONS)

# The three columns of every comparison, in display order.
MODELS: tuple[str, ...] = ("teacher", "base", "distilled")
MODEL_LABELS: dict[str, str] = {"teacher": "Teacher", "base": "Base Student", "distilled": "Distilled Student"}
