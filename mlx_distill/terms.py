"""The teacher terms notice: shown by the CLI when the teacher is Claude, and in model cards."""

from __future__ import annotations

TERMS_NOTICE = (
    "Notice: Anthropic's terms forbid using Claude's outputs to train models that compete "
    "with Anthropic's own. mlx-distill is for narrow, task-specific students (a coding "
    "helper for your codebase, a classifier, a formatter), not general-purpose assistants. "
    "You are responsible for your use: https://www.anthropic.com/legal/commercial-terms"
)


def is_claude_teacher(spec: str | None) -> bool:
    """True for ``anthropic:...`` teacher specs (and bare claude-* model names)."""
    s = (spec or "").strip().lower()
    return s.startswith("anthropic:") or s.startswith("claude")
