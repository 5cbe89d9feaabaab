"""Shared bits for scripts/bench_*.py: machine info, the docs section writer, the JSON line.

Each benchmark owns one section of docs/benchmarks.md, between
``<!-- bench:NAME -->`` and ``<!-- /bench:NAME -->``; rerunning a benchmark
replaces only its own section. Every script prints its figures as one JSON
object on its last line.
"""

from __future__ import annotations

import json
import os
import platform
import re
import subprocess
import sys
from datetime import datetime, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DOC = ROOT / "docs" / "benchmarks.md"
HEADER = """# Benchmarks

Every figure here was produced by a script in `scripts/` (rerun them all with
`scripts/bench_all.sh`). Each section records the machine and the date it was
measured. Ratios compare two ways of doing the same work, measured one after
the other in the same run, because the machines are shared and noisy.
"""


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        if sys.platform == "darwin":
            try:
                cpu = subprocess.check_output(["sysctl", "-n", "machdep.cpu.brand_string"], text=True).strip()
            except (OSError, subprocess.CalledProcessError):
                pass
    mem = ""
    try:
        kb = int(re.search(r"MemTotal:\s+(\d+)", Path("/proc/meminfo").read_text()).group(1))
        mem = f", {kb / 1024**2:.0f} GB RAM"
    except (OSError, AttributeError):
        pass
    versions = []
    from importlib.metadata import PackageNotFoundError, version

    for dist in ("mlx", "mlx-lm", "torch", "transformers", "peft"):
        try:
            versions.append(f"{dist} {version(dist)}")
        except PackageNotFoundError:
            pass
    return f"{platform.system()} {platform.machine()}, {cpu}, {os.cpu_count()} cores{mem}; " + ", ".join(versions)


def today() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%d")


def write_section(name: str, title: str, body: str) -> None:
    """Replace (or append) this benchmark's section in docs/benchmarks.md."""
    DOC.parent.mkdir(parents=True, exist_ok=True)
    text = DOC.read_text() if DOC.exists() else HEADER
    block = (
        f"<!-- bench:{name} -->\n## {title}\n\n"
        f"Measured {today()} on {machine()}.\n\n{body.strip()}\n<!-- /bench:{name} -->"
    )
    pattern = re.compile(rf"<!-- bench:{re.escape(name)} -->.*?<!-- /bench:{re.escape(name)} -->", re.S)
    text = pattern.sub(lambda _: block, text) if pattern.search(text) else text.rstrip() + "\n\n" + block + "\n"
    DOC.write_text(text)


def emit(figures: dict) -> None:
    """The last line of every benchmark's output: one JSON object."""
    print(json.dumps(figures, sort_keys=True), flush=True)
