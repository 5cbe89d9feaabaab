"""Run untrusted model code in a contained subprocess (parent side).

Layers, each one reported in ``SandboxResult.containment`` as it was really
achieved (the child checks; nothing is assumed). All platforms:

* secrets: the child's environment is built from an allow-list (never a copy of
  ours, so no ``*_API_KEY``/``*_TOKEN``); ``HOME`` and ``TMPDIR`` are the fresh
  temp work dir, which is also its cwd;
* time: per-test SIGALRM, RLIMIT_CPU, and a wall limit after which the whole
  process group is SIGKILLed (``start_new_session`` + ``os.killpg``);
* size: RLIMIT_AS (enforced on Linux; macOS does not enforce it, so there a huge
  allocation is stopped only by the wall limit or the OS), RLIMIT_FSIZE,
  RLIMIT_NOFILE, no core dumps;
* Python audit hook: no exec/spawn/fork, no ctypes, no signals to other pids, no
  sockets or DNS (AF_UNIX inside the work dir only), writes only inside the work
  dir, reads only of the work dir, the stdlib and a few device files (so not
  ``/proc/<parent>/environ`` nor ``~/.aws``).

Kernel layers, where the OS gives them:

==================  =======================  =======================  ==========
layer               Linux, root (CI here)    Linux, not root          macOS
==================  =======================  =======================  ==========
network             new netns (no devices)   new user+net namespace   hook only
                                             (if userns is enabled)
uid                 dropped to nobody        unchanged                unchanged
==================  =======================  =======================  ==========

With the uid dropped the kernel itself refuses writes to the user's files and
reads of ``/proc/<parent>/environ``; world-writable places such as ``/tmp``
stay writable to ``nobody``, which only the audit hook stops.

Not contained: the audit hook is defence in depth, not a boundary. Code that
sets out to defeat it in-process (e.g. by rewriting the hook's closure) can,
so without the kernel layers (macOS, or Linux without root or userns) a
*deliberately* hostile answer could reach the network or write files the user
can write. Model answers to coding prompts are careless, not hostile; for
hostile code use a VM or container. The uid drop needs a Python that
``nobody`` can read (pyenv under a 0700 /root is not): :func:`sandbox_python`
probes candidates once and reports when it had to keep the uid.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

HARNESS = Path(__file__).with_name("_harness.py")
NOBODY = 65534

# A variable whose name matches this never reaches the child, even via extra_env.
SECRET_NAME = re.compile(
    r"(KEY|TOKEN|SECRET|PASSWORD|PASSWD|CREDENTIAL|AUTH|COOKIE|SESSION)|^(ANTHROPIC|OPENAI|AWS|HF|HUGGING|GH|GITHUB)_",
    re.I,
)


@dataclass
class SandboxLimits:
    """Limits per run. 20 s wall covers the slowest held-out suite (~3 s) with room on a busy CPU."""

    timeout_s: float = 20.0
    test_timeout_s: float = 5.0
    cpu_s: int = 20
    memory_mb: int = 1024  # address space: 20 threads x 8 MB stacks + Python fit easily
    fsize_mb: int = 16
    nofile: int = 64
    nproc: int = 64
    netns: bool = True
    drop_uid: bool = True
    audit_hook: bool = True  # off only in tests that check the kernel layers on their own


@dataclass
class SandboxResult:
    """Raw outcome of one child run; :mod:`execution` turns it into pass/fail."""

    records: list[dict[str, Any]] = field(default_factory=list)
    containment: dict[str, Any] = field(default_factory=dict)
    finished: bool = False
    timed_out: bool = False
    returncode: int | None = None
    signal: str | None = None
    duration_s: float = 0.0
    stdout_tail: str = ""
    stderr_tail: str = ""
    blocked: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def scrub_env(env: dict[str, str]) -> dict[str, str]:
    """Drop variables that look like secrets (``ANTHROPIC_API_KEY``, ``HF_TOKEN`` ...)."""
    return {k: v for k, v in env.items() if not SECRET_NAME.search(k)}


def child_env(work: Path, extra: dict[str, str] | None = None) -> dict[str, str]:
    """The child's whole environment: an allow-list, never a copy of ours."""
    env = {
        "PATH": "/usr/bin:/bin",
        "HOME": str(work),
        "TMPDIR": str(work / "tmp"),
        "LANG": "C.UTF-8",
        "LC_ALL": "C.UTF-8",
        "PYTHONIOENCODING": "utf-8",
        "PYTHONDONTWRITEBYTECODE": "1",
        "PYTHONHASHSEED": "0",
        "PYTHONUNBUFFERED": "1",
    }
    env.update(scrub_env(extra or {}))
    return env


_PROBE_LOCK = threading.Lock()
_PROBED: dict[bool, tuple[str, bool]] = {}


def _is_root() -> bool:
    return hasattr(os, "geteuid") and os.geteuid() == 0


def sandbox_python(drop_uid: bool = True) -> tuple[str, bool]:
    """(interpreter, will_drop_uid). As root, the first Python usable as ``nobody``.

    A uid drop inside a Python that lives under a 0700 home (pyenv in /root) would
    make every later stdlib import fail, so candidates are tried once with a
    probe that imports what answers use; if none works, the uid is kept (reported).
    """
    want = drop_uid and _is_root()
    if not want:
        return sys.executable, False
    with _PROBE_LOCK:
        if want in _PROBED:
            return _PROBED[want]
        probe = (
            "def test_imports():\n"
            "    import sqlite3, threading, dataclasses, functools, typing, collections, json, time\n"
            "    import abc, enum, queue, logging, contextlib, hashlib, heapq, itertools, math, re\n"
        )
        seen = []
        candidates = [
            sys.executable,
            getattr(sys, "_base_executable", ""),
            shutil.which("python3") or "",
            f"/usr/bin/python{sys.version_info[0]}.{sys.version_info[1]}",
            "/usr/bin/python3",
        ]
        for exe in candidates:
            if not exe or not os.path.exists(exe) or os.path.realpath(exe) in seen:
                continue
            seen.append(os.path.realpath(exe))
            res = _run("python", "", {"code": probe}, SandboxLimits(timeout_s=15), exe, True)
            if res.finished and any(
                r.get("test") == "test_imports" and r.get("ok") for r in res.records
            ):
                _PROBED[want] = (exe, True)
                return _PROBED[want]
        _PROBED[want] = (sys.executable, False)
        return _PROBED[want]


def _tail(path: Path, n: int = 2000) -> str:
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            size = f.tell()
            f.seek(max(0, size - n))
            return f.read().decode("utf-8", "replace")
    except OSError:
        return ""


def run_in_sandbox(
    kind: str,
    answer: str,
    spec: dict[str, Any],
    limits: SandboxLimits | None = None,
    extra_env: dict[str, str] | None = None,
) -> SandboxResult:
    """Run ``answer`` (Python source, or one SQL query) against ``spec`` in a fresh child.

    ``spec`` for python: ``{"code": tests, "entrypoint"?}``; for sql: ``{"cases": [...]}``.
    """
    limits = limits or SandboxLimits()
    exe, drop = sandbox_python(limits.drop_uid)
    if limits.drop_uid and _is_root() and not drop:
        spec = {**spec, "drop_note": "no Python found that uid 65534 can run; the uid was kept"}
    return _run(kind, answer, spec, limits, exe, drop, extra_env)


def _run(
    kind: str,
    answer: str,
    spec: dict[str, Any],
    limits: SandboxLimits,
    exe: str,
    drop: bool,
    extra_env: dict[str, str] | None = None,
) -> SandboxResult:
    top = Path(tempfile.mkdtemp(prefix="mlxd-sandbox-"))
    work, ctl = top / "work", top / "ctl"
    work.mkdir()
    (work / "tmp").mkdir()
    ctl.mkdir(mode=0o700)
    try:
        if drop:
            os.chmod(top, 0o711)
            for p in (work, work / "tmp"):
                os.chown(p, NOBODY, NOBODY)
        full = {
            **spec,
            "kind": kind,
            "work": str(work),
            "test_timeout_s": limits.test_timeout_s,
            "cpu_s": limits.cpu_s,
            "memory_mb": limits.memory_mb,
            "fsize_mb": limits.fsize_mb,
            "nofile": limits.nofile,
            "nproc": limits.nproc,
            "netns": limits.netns,
            "drop_uid": drop,
            "audit_hook": limits.audit_hook,
        }
        (ctl / "spec.json").write_text(json.dumps(full), encoding="utf-8")
        (ctl / "answer.txt").write_text(answer, encoding="utf-8")
        shutil.copy(HARNESS, ctl / "harness.py")
        nonce = secrets.token_hex(16)
        return _spawn(exe, ctl, work, nonce, limits, extra_env)
    finally:
        shutil.rmtree(top, ignore_errors=True)


def _spawn(
    exe: str,
    ctl: Path,
    work: Path,
    nonce: str,
    limits: SandboxLimits,
    extra_env: dict[str, str] | None,
) -> SandboxResult:
    res = SandboxResult()
    out_path, err_path = ctl / "stdout", ctl / "stderr"
    t0 = time.perf_counter()
    with open(out_path, "wb") as out, open(err_path, "wb") as err:
        proc = subprocess.Popen(
            [exe, "-I", "-S", "-B", str(ctl / "harness.py"), str(ctl)],
            stdin=subprocess.PIPE,
            stdout=out,
            stderr=err,
            cwd=str(work),
            env=child_env(work, extra_env),
            start_new_session=True,
            close_fds=True,
        )
        try:
            proc.communicate(input=(nonce + "\n").encode(), timeout=limits.timeout_s)
        except subprocess.TimeoutExpired:
            res.timed_out = True
        finally:
            # Kill the whole group even on a clean exit: answers may leave children
            # (should the audit hook have been defeated) that outlive the harness.
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
            proc.wait()
    res.duration_s = round(time.perf_counter() - t0, 3)
    res.returncode = proc.returncode
    if proc.returncode is not None and proc.returncode < 0:
        try:
            res.signal = signal.Signals(-proc.returncode).name
        except ValueError:
            res.signal = str(-proc.returncode)
    res.stdout_tail = _tail(out_path)
    res.stderr_tail = _tail(err_path)
    # Whole file: the child wrote it under RLIMIT_FSIZE, so it is at most fsize_mb.
    try:
        result_text = (ctl / "result.jsonl").read_text(encoding="utf-8", errors="replace")
    except OSError:
        result_text = ""
    for line in result_text.splitlines():
        if not line.startswith(nonce):
            continue
        try:
            rec = json.loads(line[len(nonce) :])
        except json.JSONDecodeError:
            continue
        if "layers" in rec:
            res.containment = rec["layers"]
        elif rec.get("done"):
            res.finished = True
            res.blocked = list(rec.get("blocked") or [])
        else:
            res.records.append(rec)
    return res
