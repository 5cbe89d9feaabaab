"""File helpers: JSONL reading with file:line errors, crash-safe appends, atomic writes."""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from mlx_distill.errors import DataError


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


@contextmanager
def atomic_path(path: str | Path, suffix: str = ".tmp") -> Iterator[Path]:
    """A temp path beside ``path`` to write; on success it is fsynced and renamed onto ``path``.

    On any error the temp file is removed and ``path`` is left as it was. The
    file gets the permissions a plain ``open`` would give (mkstemp's are 0600).
    """
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=p.parent, prefix=f".{p.name}.", suffix=suffix)
    os.close(fd)
    try:
        os.chmod(tmp, 0o666 & ~_umask())
        yield Path(tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, p)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_text_atomic(path: str | Path, text: str) -> Path:
    """Write ``text`` to ``path`` via a temp file and rename: never a half-written file."""
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return Path(path)


def write_json_atomic(path: str | Path, obj: Any) -> Path:
    return write_text_atomic(path, json.dumps(obj, indent=2, ensure_ascii=False) + "\n")


def write_jsonl_atomic(path: str | Path, rows: list[dict[str, Any]]) -> Path:
    return write_text_atomic(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))


def iter_jsonl(path: str | Path, *, what: str = "record") -> Iterator[tuple[int, dict[str, Any]]]:
    """Yield ``(line_number, object)``; blank lines are skipped.

    Raises DataError naming the file and line for non-UTF-8 bytes, invalid
    JSON, or a line that is not a JSON object.
    """
    p = Path(path)
    if not p.is_file():
        raise DataError("no such file", p, fix=f"check the path of the {what} file")
    with open(p, "rb") as f:
        for lineno, raw in enumerate(f, start=1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise DataError(
                    f"not valid UTF-8 (byte {e.start}: {raw[e.start:e.start + 1]!r})",
                    p, lineno, fix="re-save the file as UTF-8",
                ) from None
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(
                    f"invalid JSON at column {e.colno}: {e.msg}",
                    p, lineno, fix=f"each line must be one JSON object ({what})",
                ) from None
            if not isinstance(obj, dict):
                raise DataError(
                    f"expected a JSON object, got {type(obj).__name__}",
                    p, lineno, fix=f"each line must be one JSON object ({what})",
                )
            yield lineno, obj


def read_jsonl(path: str | Path, *, what: str = "record") -> list[dict[str, Any]]:
    return [obj for _, obj in iter_jsonl(path, what=what)]


def repair_torn_tail(path: str | Path) -> int:
    """Cut a last line that has no newline (a write torn by a crash). Returns bytes cut."""
    p = Path(path)
    if not p.exists() or p.stat().st_size == 0:
        return 0
    with open(p, "rb+") as f:
        size = f.seek(0, os.SEEK_END)
        pos = size
        chunk = 4096
        while pos > 0:
            start = max(0, pos - chunk)
            f.seek(start)
            data = f.read(pos - start)
            if start + len(data) == size and data.endswith(b"\n"):
                return 0
            nl = data.rfind(b"\n")
            if nl >= 0:
                keep = start + nl + 1
                f.truncate(keep)
                return size - keep
            pos = start
        f.truncate(0)
        return size


class JsonlAppender:
    """Append-only JSONL: one ``write`` per record, flushed (and fsynced) at once.

    Opening repairs a torn last line first, so a ``kill -9`` mid-write loses at
    most the record being written, never the file.
    """

    def __init__(self, path: str | Path, fsync: bool = True):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.repaired_bytes = repair_torn_tail(self.path)
        self._f = open(self.path, "a", encoding="utf-8")
        self._fsync = fsync

    def append(self, record: dict[str, Any]) -> None:
        self._f.write(json.dumps(record, ensure_ascii=False) + "\n")
        self._f.flush()
        if self._fsync:
            os.fsync(self._f.fileno())

    def close(self) -> None:
        self._f.close()

    def __enter__(self) -> JsonlAppender:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
