"""``mlx-distill prepare``: teacher data (JSONL) to mlx-lm chat data (train/valid/test).

Input, one record a line: at least ``{"id", "prompt", "response", "stop_reason"}``;
``system``, ``model``, ``usage`` and the collector's extra fields are allowed.
Output: ``DIR/train.jsonl``, ``DIR/valid.jsonl`` and (when it has rows)
``DIR/test.jsonl``, each line ``{"messages": [...], "id": ...}``, which upstream
``mlx_lm lora --data DIR`` reads unchanged (it ignores the extra ``id``).

Two rules matter for distillation:

* The teacher record's ``system`` is the *teacher's* context (the offline demo
  gives its teacher a long style prompt: context distillation). The student
  must learn to answer the plain prompt, so it is never copied into the
  examples; only ``--system TEXT`` adds a system message for the student.
* The split is a pure function of the prompt id (a salted SHA-256), so adding
  records never moves an existing one between train and valid, and held-out ids
  (and held-out prompt texts under another id) always go to test.

An empty ``test.jsonl`` is not written: mlx-lm 0.32's ``load_local_dataset``
reads an existing empty file as ``data[0]`` and fails with an IndexError.
"""

from __future__ import annotations

import hashlib
import json
import re
import statistics
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import click

from mlx_distill.config import click_options, opt, resolve, save_config
from mlx_distill.errors import ConfigError, DataError, cli_errors
from mlx_distill.files import iter_jsonl, write_json_atomic, write_jsonl_atomic

SPLITS = ("train", "valid", "test")
REQUIRED = ("id", "prompt", "response", "stop_reason")
# Stop reasons that mean the text is cut off (Anthropic: max_tokens,
# model_context_window_exceeded; mlx/OpenAI style: length) or is not a plain
# answer (refusal, tool_use, pause_turn). Training on a cut-off answer teaches
# the student to stop mid-sentence, so these rows are dropped and counted.
TRUNCATED = frozenset({"max_tokens", "length", "model_context_window_exceeded"})
NOT_AN_ANSWER = frozenset({"refusal", "tool_use", "pause_turn"})
_SPLIT_SALT = "mlx-distill-split-v1"
CONFIG_NAME = "prepare_config.json"
STATS_NAME = "prepare_stats.json"


@dataclass
class PrepareConfig:
    teacher_data: str | None = opt(None, "Teacher data JSONL ({'id','prompt','response','stop_reason'} per line).")
    out: str | None = opt(None, "Output folder for train.jsonl, valid.jsonl and test.jsonl.")
    held_out: str | None = opt(None, "Prompt JSONL whose ids (and prompt texts) always go to test.")
    valid_fraction: float = opt(0.1, "Share of non-held-out examples for validation (by id hash).")
    test_fraction: float = opt(0.0, "Share of non-held-out examples for test, besides --held-out.")
    system: str | None = opt(None, "System message for the student's examples (TEXT or @file); none by default.")
    student: str | None = opt(None, "Student model (demo, .gguf, dir, hub id): report token lengths in its tokenizer.")
    max_seq_length: int = opt(2048, "With --student: count the examples this length would truncate.")
    keep_truncated: bool = opt(False, "Keep answers cut at the token limit, trimmed to their last complete "
                                      "paragraph (default: drop them).")
    overwrite: bool = opt(False, "Replace existing files in --out that differ from the new ones.")


@dataclass
class PrepareResult:
    out: Path
    files: dict[str, Path]  # split -> path, only the splits written
    counts: dict[str, int]  # train/valid/test sizes
    dropped: dict[str, int]  # reason -> count
    lengths: dict[str, Any] | None = None  # with --student: token length stats
    notes: list[str] = field(default_factory=list)


def split_of(example_id: str, valid_fraction: float, test_fraction: float = 0.0) -> str:
    """'train', 'valid' or 'test' from a salted hash of the id alone (stable as data grows)."""
    return _bucket(_hash01(example_id), valid_fraction, test_fraction)


def _hash01(example_id: str) -> float:
    digest = hashlib.sha256(f"{_SPLIT_SALT}:{example_id}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def _bucket(u: float, valid_fraction: float, test_fraction: float) -> str:
    if u < test_fraction:
        return "test"
    if u < test_fraction + valid_fraction:
        return "valid"
    return "train"


def _norm(text: str) -> str:
    return " ".join(text.split())


def _check_record(obj: dict[str, Any], path: Path, lineno: int) -> tuple[str, str, str | None, str | None]:
    """(id, prompt, response, stop_reason) of one line, or DataError naming the line."""
    expected = '{"id", "prompt", "response", "stop_reason"} (optional "system", "model", "usage")'
    missing = [k for k in REQUIRED if k not in obj]
    if missing:
        raise DataError(
            f"missing {', '.join(repr(k) for k in missing)}; got keys {sorted(obj)}",
            path, lineno, fix=f"each teacher-data line must have {expected}",
        )
    rid = obj["id"]
    if isinstance(rid, bool) or not isinstance(rid, (str, int)) or str(rid).strip() == "":
        raise DataError(f"'id' must be a non-empty string, got {rid!r}", path, lineno,
                        fix="give every record a unique string id")
    for key, allow_null in (("prompt", False), ("response", True), ("stop_reason", True)):
        value = obj[key]
        if not (isinstance(value, str) or (allow_null and value is None)):
            raise DataError(f"{key!r} must be a string, got {type(value).__name__} {value!r:.60}",
                            path, lineno, fix=f"each teacher-data line must have {expected}")
    return str(rid), obj["prompt"], obj["response"], obj["stop_reason"]


def trim_truncated(text: str, min_keep: float = 0.4) -> str | None:
    """A cut-off answer trimmed back to a clean end, or None if too little is left.

    An unclosed code fence keeps the complete top-level blocks of its code (up
    to the last line that starts at column 0 after a blank line: the block
    before it has ended) and is closed; with none, it is cut off before it
    opens. Outside code, the unfinished last paragraph goes. The result ends
    at a paragraph or block boundary, so a student trained on it learns to end
    answers cleanly rather than mid-sentence. ``None`` when less than
    ``min_keep`` of the text (by characters) would remain.
    """
    body = text.rstrip()
    fences = [m.start() for m in re.finditer(r"(?m)^```", body)]
    if len(fences) % 2 == 1:
        start = fences[-1]
        code = body[start:]
        first_line = code.find("\n")
        cuts = [m.start() for m in re.finditer(r"\n\n(?=\S)", code) if m.start() > first_line > 0]
        if cuts and code[: cuts[-1]].strip() != code[:first_line].strip():
            body = body[:start] + code[: cuts[-1]].rstrip() + "\n```"
        else:
            body = body[:start].rstrip()
    if not body.endswith("```"):
        cut = body.rfind("\n\n")
        if cut > 0:
            body = body[:cut].rstrip()
    if not body or body.count("```") % 2 == 1 or len(body) < min_keep * len(text.strip()):
        return None
    return body


def build_splits(
    teacher_data: str | Path,
    *,
    held_out_ids: set[str] = frozenset(),  # type: ignore[assignment]
    held_out_texts: set[str] = frozenset(),  # type: ignore[assignment]
    valid_fraction: float = 0.1,
    test_fraction: float = 0.0,
    system: str | None = None,
    keep_truncated: bool = False,
) -> tuple[dict[str, list[dict[str, Any]]], Counter[str], list[str]]:
    """Read and validate teacher data; return (rows per split, dropped counts, notes).

    Pure (writes nothing); any malformed line raises DataError with file:line.
    With ``keep_truncated``, answers cut at the token limit are kept, trimmed back
    to their last complete paragraph (see :func:`trim_truncated`).
    """
    kept_trimmed = 0
    path = Path(teacher_data)
    splits: dict[str, list[dict[str, Any]]] = {s: [] for s in SPLITS}
    hashes: dict[str, float] = {}
    dropped: Counter[str] = Counter()
    seen: dict[str, int] = {}
    total = 0
    for lineno, obj in iter_jsonl(path, what="teacher record"):
        total += 1
        rid, prompt, response, stop = _check_record(obj, path, lineno)
        if rid in seen:
            dropped["duplicate id"] += 1
            continue
        seen[rid] = lineno
        if stop in TRUNCATED:
            trimmed = trim_truncated(response or "") if keep_truncated else None
            if trimmed is None:
                dropped[f"stopped at the token limit ({stop})"] += 1
                continue
            response = trimmed
            kept_trimmed += 1
        if stop in NOT_AN_ANSWER:
            dropped[f"not an answer ({stop})"] += 1
            continue
        if not prompt.strip() or response is None or not response.strip():
            dropped["empty prompt or response"] += 1
            continue
        messages = [{"role": "system", "content": system}] if system else []
        messages += [{"role": "user", "content": prompt}, {"role": "assistant", "content": response}]
        if rid in held_out_ids or _norm(prompt) in held_out_texts:
            split = "test"
        else:
            hashes[rid] = _hash01(rid)
            split = _bucket(hashes[rid], valid_fraction, test_fraction)
        splits[split].append({"messages": messages, "id": rid})
    if total == 0:
        raise DataError("the file has no records", path,
                        fix='add one JSON object per line: {"id", "prompt", "response", "stop_reason"}')
    notes: list[str] = []
    if kept_trimmed:
        notes.append(f"{kept_trimmed} answers cut at the token limit were kept, trimmed to their last "
                     "complete paragraph (--keep-truncated)")
    # A pure threshold can leave a small set with no validation example
    # (10 examples x 0.1 has a 35% chance of none); then the train example
    # with the smallest hash moves to valid, which is still a function of ids.
    if valid_fraction > 0 and not splits["valid"] and len(splits["train"]) >= 2:
        pick = min(splits["train"], key=lambda r: hashes[r["id"]])
        splits["train"].remove(pick)
        splits["valid"].append(pick)
        notes.append(f"valid was empty at --valid-fraction {valid_fraction}; moved {pick['id']!r} there")
    if not splits["train"]:
        kept = sum(len(v) for v in splits.values())
        raise DataError(
            f"no training examples left ({total} records, {kept} kept, dropped: "
            f"{dict(dropped) or 'none'})", path,
            fix="collect more answers (raise the teacher's max tokens if many were cut off), "
                "or lower --valid-fraction/--test-fraction",
        )
    return splits, dropped, notes


def length_stats(
    splits: dict[str, list[dict[str, Any]]], tokenizer: Any, max_seq_length: int
) -> dict[str, Any]:
    """Token lengths in the student's chat template (as mlx-lm's ChatDataset counts them)."""
    lengths: list[int] = []
    prompt_over = 0
    for rows in splits.values():
        for r in rows:
            full = tokenizer.apply_chat_template(r["messages"], return_dict=False)
            lengths.append(len(full))
            if len(full) > max_seq_length:
                head = tokenizer.apply_chat_template(r["messages"][:-1], add_generation_prompt=True,
                                                     return_dict=False)
                prompt_over += len(head) >= max_seq_length
    if not lengths:
        return {}
    return {
        "examples": len(lengths),
        "min": min(lengths),
        "median": statistics.median(lengths),
        "max": max(lengths),
        "total_tokens": sum(lengths),
        "max_seq_length": max_seq_length,
        "truncated": sum(n > max_seq_length for n in lengths),
        "no_answer_left": prompt_over,
    }


def _load_tokenizer(spec: str) -> Any:
    from mlx_lm.utils import load_tokenizer

    from mlx_distill import models

    info = models.resolve(spec)
    cfg = json.loads((Path(info.path) / "config.json").read_text())
    return load_tokenizer(Path(info.path), eos_token_ids=cfg.get("eos_token_id"))


def _jsonl_text(rows: list[dict[str, Any]]) -> str:
    return "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)


def prepare(
    cfg: PrepareConfig,
    *,
    echo: Callable[[str], None] = print,
    tokenizer_loader: Callable[[str], Any] = _load_tokenizer,
) -> PrepareResult:
    """Validate teacher data, split it and write train/valid/test.jsonl into ``cfg.out``.

    Nothing is written unless every line parses. Existing files that would
    change need ``cfg.overwrite``; identical ones are left as they are.
    """
    from mlx_distill.generate import read_text_arg
    from mlx_distill.prompts import load_prompts

    if not cfg.teacher_data or not cfg.out:
        raise ConfigError("--teacher-data and --out are required")
    for name in ("valid_fraction", "test_fraction"):
        v = getattr(cfg, name)
        if not 0.0 <= v < 1.0:
            raise ConfigError(f"--{name.replace('_', '-')} {v}: expected a share in [0, 1), e.g. 0.1")
    if cfg.valid_fraction + cfg.test_fraction >= 1.0:
        raise ConfigError(f"--valid-fraction {cfg.valid_fraction} + --test-fraction {cfg.test_fraction} "
                          "leaves nothing to train on; keep their sum below 1")
    if cfg.max_seq_length < 2:
        raise ConfigError(f"--max-seq-length {cfg.max_seq_length}: expected at least 2 tokens")
    out = Path(cfg.out)
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out {out} is a file; pass a folder")
    held_ids: set[str] = set()
    held_texts: set[str] = set()
    if cfg.held_out:
        held = load_prompts(cfg.held_out)
        held_ids = {p.id for p in held}
        held_texts = {_norm(p.prompt) for p in held}
    system = read_text_arg(cfg.system)
    splits, dropped, notes = build_splits(
        cfg.teacher_data, held_out_ids=held_ids, held_out_texts=held_texts,
        valid_fraction=cfg.valid_fraction, test_fraction=cfg.test_fraction, system=system,
        keep_truncated=cfg.keep_truncated,
    )
    if cfg.held_out:
        present = {r["id"] for r in splits["test"]}
        missing = len(held_ids - present)
        if missing:
            notes.append(f"{missing} of {len(held_ids)} held-out prompts have no usable teacher answer in "
                         f"{cfg.teacher_data}, so test.jsonl leaves them out (they are never trained on either way)")
    lengths = None
    if cfg.student:
        lengths = length_stats(splits, tokenizer_loader(cfg.student), cfg.max_seq_length)

    # Decide every file before writing any, so a refusal leaves the folder untouched.
    texts = {s: _jsonl_text(rows) for s, rows in splits.items() if rows}
    targets = {s: out / f"{s}.jsonl" for s in SPLITS}
    changed = [p for s, p in targets.items() if p.exists() and (s not in texts or p.read_text(encoding="utf-8") != texts[s])]
    if changed and not cfg.overwrite:
        raise ConfigError(
            f"--out {out} already holds different {', '.join(p.name for p in changed)}; pass --overwrite "
            "to replace them, or choose another --out"
        )
    if "test" not in texts:
        notes.append("test.jsonl not written: no held-out or test examples (pass --held-out or --test-fraction)")
    files: dict[str, Path] = {}
    for s in SPLITS:
        if s in texts:
            write_jsonl_atomic(targets[s], splits[s])
            files[s] = targets[s]
        elif targets[s].exists():  # a stale split from an earlier run (only reached with --overwrite)
            targets[s].unlink()
    counts = {s: len(splits[s]) for s in SPLITS}
    save_config(cfg, out / CONFIG_NAME)
    write_json_atomic(out / STATS_NAME, {"counts": counts, "dropped": dict(dropped), "lengths": lengths,
                                         "notes": notes})
    result = PrepareResult(out=out, files=files, counts=counts, dropped=dict(dropped), lengths=lengths,
                           notes=notes)
    for line in summary(result):
        echo(line)
    return result


def summary(r: PrepareResult) -> list[str]:
    """Human-readable lines: split sizes, drops with reasons, token lengths."""
    lines = [f"train {r.counts['train']}, valid {r.counts['valid']}, test {r.counts['test']} -> {r.out}"]
    if r.dropped:
        lines.append(f"dropped {sum(r.dropped.values())}: "
                     + ", ".join(f"{n} {why}" for why, n in sorted(r.dropped.items())))
    else:
        lines.append("dropped 0")
    if r.lengths:
        s = r.lengths
        lines.append(
            f"student tokens per example: min {s['min']}, median {s['median']:g}, max {s['max']} "
            f"({s['total_tokens']} in all); {s['truncated']} of {s['examples']} exceed "
            f"--max-seq-length {s['max_seq_length']}"
            + (f", {s['no_answer_left']} of them with no answer token left" if s["no_answer_left"] else "")
        )
    lines.extend(f"note: {n}" for n in r.notes)
    return lines


@click.command("prepare")
@click_options(PrepareConfig)
@click.option("--config", "config_file", type=click.Path(), help="YAML file with these options.")
@cli_errors
def cli(config_file: str | None, **kwargs: Any) -> None:
    """Turn teacher data into mlx-lm chat JSONL: DIR/train.jsonl, valid.jsonl, test.jsonl."""
    cfg = resolve(PrepareConfig, kwargs, config_file, section="prepare")
    result = prepare(cfg, echo=lambda s: click.echo(s, err=True))
    click.echo(str(result.out))


if __name__ == "__main__":
    cli()
