"""Domain errors and the one place that turns them into CLI errors.

Stage code raises these; only the CLI layer converts them to
``click.ClickException`` (see :func:`cli_errors`). ``MLX_DISTILL_DEBUG=1``
re-raises with the full traceback.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable
from typing import Any, TypeVar

F = TypeVar("F", bound=Callable[..., Any])


class DistillError(Exception):
    """Base class. ``exit_code`` 1: the work failed; 2: the input is wrong."""

    exit_code = 1


class ConfigError(DistillError):
    """A flag, config value or environment setting is wrong. Nothing was done."""

    exit_code = 2


class DataError(DistillError):
    """An input file is malformed. Carries the file and line where known."""

    exit_code = 2

    def __init__(self, message: str, path: object = None, line: int | None = None, fix: str = ""):
        where = ""
        if path is not None:
            where = f"{path}:{line}: " if line is not None else f"{path}: "
        text = where + message
        if fix:
            text += f"\n  fix: {fix}"
        super().__init__(text)
        self.path = path
        self.line = line


class VerificationError(DistillError):
    """A numeric check (export parity, etc.) failed; the message has the numbers."""


class BudgetExceeded(DistillError):
    """Stopped before spending more than ``--budget``."""


def cli_errors(fn: F) -> F:
    """Decorate a click callback: DistillError -> ClickException with its exit code."""
    import click

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except DistillError as e:
            if os.environ.get("MLX_DISTILL_DEBUG") == "1":
                raise
            exc = click.ClickException(str(e))
            exc.exit_code = e.exit_code
            raise exc from e
        except KeyboardInterrupt:
            if os.environ.get("MLX_DISTILL_DEBUG") == "1":
                raise
            raise click.ClickException("interrupted; rerun the same command to resume") from None

    return wrapper  # type: ignore[return-value]
