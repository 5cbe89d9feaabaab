"""Check that exported tokenizers load in transformers 4.57 as well as in the installed 5.x.

    python scripts/check_export_tokenizer_compat.py EXPORT_DIR [EXPORT_DIR ...] [--python PY]

transformers 4.57 crashes on the list-valued ``extra_special_tokens`` that 5.x's
``save_pretrained`` writes (FACTS: "Fuse and export"), so an export must be
checked in a real 4.57. Without ``--python`` (or ``$MLX_DISTILL_TF4_PYTHON``)
this builds a small venv once (``transformers==4.57.*`` with no torch: ~40 s from
PyPI) under ``$MLX_DISTILL_HOME/tf457-venv`` and reuses it.

For each folder it encodes three chats with the chat template in both versions
and prints one JSON line per folder; exit 1 if any folder fails to load or
encodes differently.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import venv
from pathlib import Path

CHATS = [
    [{"role": "user", "content": "Write a Python function that reverses a string."}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is 2 + 2?"},
     {"role": "assistant", "content": "4"}],
    [{"role": "user", "content": "Ünïcödé, tabs\tand 12345 digits"}],
]

# Runs inside either interpreter: prints {"version", "ids" | "error"} as JSON.
PROBE = r"""
import json, sys
out = {}
try:
    import transformers
    from transformers import AutoTokenizer
    out["version"] = transformers.__version__
    tok = AutoTokenizer.from_pretrained(sys.argv[1])
    chats = json.loads(sys.argv[2])
    out["ids"] = [list(tok.apply_chat_template(c, tokenize=True, add_generation_prompt=c[-1]["role"] == "user",
                                               return_dict=False)) for c in chats]
    out["eos_token_id"] = tok.eos_token_id
except Exception as e:
    out["error"] = f"{type(e).__name__}: {e}"[:500]
print(json.dumps(out))
"""


def tf4_python(cache: Path) -> Path:
    """A python with transformers 4.57 (built once under ``cache``)."""
    env = os.environ.get("MLX_DISTILL_TF4_PYTHON")
    if env:
        return Path(env)
    py = cache / "bin" / "python"
    if not py.exists():
        print(f"building {cache} (transformers==4.57.*, no torch)...", file=sys.stderr)
        venv.create(cache, with_pip=True)
        subprocess.run([str(py), "-m", "pip", "install", "-q", "transformers==4.57.*", "jinja2"], check=True)
    return py


def probe(python: str | Path, folder: Path) -> dict:
    res = subprocess.run([str(python), "-c", PROBE, str(folder), json.dumps(CHATS)],
                         capture_output=True, text=True, timeout=300)
    lines = [ln for ln in res.stdout.splitlines() if ln.startswith("{")]
    return json.loads(lines[-1]) if lines else {"error": res.stderr.strip()[-500:]}


def check(folders: list[Path], python: str | Path) -> list[dict]:
    results = []
    for folder in folders:
        new, old = probe(sys.executable, folder), probe(python, folder)
        ok = "ids" in new and "ids" in old and new["ids"] == old["ids"]
        results.append({"folder": str(folder), "ok": ok, "transformers_new": new.get("version"),
                        "transformers_old": old.get("version"), "error": old.get("error") or new.get("error"),
                        "same_ids": ok})
    return results


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("folders", nargs="+", type=Path)
    ap.add_argument("--python", help="a python with transformers 4.x (default: build a venv)")
    args = ap.parse_args()
    home = Path(os.environ.get("MLX_DISTILL_HOME") or Path.home() / ".cache" / "mlx-distill")
    python = args.python or tf4_python(home / "tf457-venv")
    results = check(args.folders, python)
    for r in results:
        print(json.dumps(r))
    return 0 if all(r["ok"] for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
