"""Training data: validate ``DIR/{train,valid}.jsonl``, tokenize once, make batches.

Formats are mlx-lm's (``{"messages": [...]}``, ``{"prompt", "completion"}``,
``{"text"}``), tokenized by mlx-lm's own dataset classes so a file trains the
same here as under ``mlx_lm lora``. Every problem is found before any compute
and names the file and line.

Batching differs from mlx-lm 0.32's ``iterate_batches`` in two measured ways:

* mlx-lm builds ``len // batch_size`` batches and drops the rest; since the
  batches are cut from a length-sorted order, the dropped examples are always
  the *longest* ones (94 examples / batch 4 = 23 batches: the 2 longest answers
  are never trained on). Here the last batch is shorter (2 rows), padded with
  empty filler rows (length 0, masked out) only to a multiple of the ranks, so
  every example is used once per epoch.
* mlx-lm's ``CacheDataset.itemlen`` measures the raw dict (its number of keys),
  so its "sort by length" keeps file order; here rows are sorted by tokens,
  which cuts padding.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from mlx_distill.errors import DataError
from mlx_distill.files import iter_jsonl

FORMATS = {
    "chat": '{"messages": [{"role": "user", "content": ...}, {"role": "assistant", "content": ...}]}',
    "completions": '{"prompt": ..., "completion": ...}',
    "text": '{"text": ...}',
}
ROLES = ("system", "user", "assistant", "tool")
PAD_TO = 32  # batch widths are 1 + a multiple of 32, so the compiled step sees few shapes


def _format_of(obj: dict[str, Any]) -> str | None:
    # The same precedence as mlx-lm's create_dataset.
    if "prompt" in obj and "completion" in obj:
        return "completions"
    if "messages" in obj:
        return "chat"
    if "text" in obj:
        return "text"
    return None


@dataclass
class TokenizedDataset:
    """(tokens, offset) per example; ``offset`` = prompt tokens excluded from the loss.

    Indexable like mlx-lm's ``CacheDataset``, so mlx-lm's ``iterate_batches``
    and ``evaluate`` accept it too.
    """

    path: Path
    items: list[tuple[list[int], int]]
    lines: list[int]  # source line of each item, for error messages
    ids: list[str | None] = field(default_factory=list)

    def __getitem__(self, idx: int) -> tuple[list[int], int]:
        return self.items[idx]

    def __len__(self) -> int:
        return len(self.items)

    def itemlen(self, idx: int) -> int:
        return len(self.items[idx][0])

    @property
    def num_tokens(self) -> int:
        return sum(len(t) for t, _ in self.items)


def _check_line(obj: dict[str, Any], fmt: str, mask_prompt: bool, path: Path, line: int) -> None:
    fix = f"each line must be {FORMATS[fmt]} with non-empty text"
    if fmt == "chat":
        msgs = obj["messages"]
        if not isinstance(msgs, list) or not msgs:
            raise DataError("'messages' must be a non-empty list", path, line, fix=fix)
        for i, m in enumerate(msgs):
            if not isinstance(m, dict) or m.get("role") not in ROLES:
                raise DataError(f"message {i} needs a 'role' in {ROLES}, got {m!r:.80}", path, line, fix=fix)
            if not isinstance(m.get("content"), str) or not m["content"].strip():
                raise DataError(f"message {i} ({m['role']}) has empty or missing 'content'", path, line,
                                fix=fix)
        if msgs[-1]["role"] != "assistant":
            raise DataError(f"the last message is {msgs[-1]['role']!r}, expected 'assistant' (the answer "
                            "to learn)", path, line, fix=fix)
    elif fmt == "completions":
        for key in ("prompt", "completion"):
            if not isinstance(obj[key], str) or not obj[key].strip():
                raise DataError(f"{key!r} is empty or not a string", path, line, fix=fix)
    else:
        if mask_prompt:
            raise DataError("--mask-prompt needs a prompt, but this file holds plain 'text' records", path,
                            line, fix="use chat or prompt/completion records, or pass --no-mask-prompt")
        if not isinstance(obj["text"], str) or not obj["text"].strip():
            raise DataError("'text' is empty or not a string", path, line, fix=fix)


def read_examples(path: str | Path, *, mask_prompt: bool = True) -> tuple[list[dict[str, Any]], list[int]]:
    """Parse and check one split without a tokenizer: (rows, line numbers), or DataError."""
    p = Path(path)
    rows: list[dict[str, Any]] = []
    lines: list[int] = []
    fmt = None
    for lineno, obj in iter_jsonl(p, what="training example"):
        this = _format_of(obj)
        if this is None:
            raise DataError(f"unknown record with keys {sorted(obj)}", p, lineno,
                            fix="use one of: " + "; ".join(FORMATS.values()))
        if fmt is None:
            fmt = this
        elif this != fmt:
            raise DataError(f"a {this} record in a {fmt} file (line {lines[0]} set the format)", p, lineno,
                            fix=f"use one format per file: {FORMATS[fmt]}")
        _check_line(obj, fmt, mask_prompt, p, lineno)
        rows.append(obj)
        lines.append(lineno)
    if not rows:
        raise DataError("the file has no examples", p, fix=f"write one example per line: {FORMATS['chat']}")
    return rows, lines


def tokenize_examples(
    path: str | Path, rows: list[dict[str, Any]], lines: list[int], tokenizer: Any, *,
    mask_prompt: bool = True, max_seq_length: int = 2048,
) -> TokenizedDataset:
    """Tokenize checked rows with mlx-lm's dataset classes; each must keep an answer token."""
    from mlx_lm.tuner.datasets import create_dataset

    p = Path(path)
    ds = create_dataset(rows, tokenizer, _Opts(mask_prompt))
    items: list[tuple[list[int], int]] = []
    for obj, lineno in zip(rows, lines):
        try:
            out = ds.process(obj)
        except Exception as e:  # a chat template that rejects these messages, etc.
            raise DataError(f"the tokenizer's chat template failed: {e}", p, lineno,
                            fix="check the roles/order this model's template accepts") from None
        tokens, offset = out if isinstance(out, tuple) else (out, 0)
        tokens = list(tokens)
        # Targets are positions max(offset, 1)..L-1 of the (truncated) row; see losses.loss_mask.
        kept = min(len(tokens), max_seq_length)
        if kept - max(offset, 1) < 1:
            why = (f"its prompt is {offset} tokens and --max-seq-length is {max_seq_length}"
                   if offset >= kept else f"it is only {len(tokens)} token(s)")
            raise DataError(f"no answer token to learn: {why}", p, lineno,
                            fix="raise --max-seq-length, shorten the prompt, or drop this example")
        items.append((tokens, offset))
    return TokenizedDataset(p, items, lines, [r.get("id") for r in rows])


def load_split(
    path: str | Path, tokenizer: Any, *, mask_prompt: bool = True, max_seq_length: int = 2048
) -> TokenizedDataset:
    """Read, validate and tokenize one split (DataError with file:line on any problem)."""
    rows, lines = read_examples(path, mask_prompt=mask_prompt)
    return tokenize_examples(path, rows, lines, tokenizer, mask_prompt=mask_prompt,
                             max_seq_length=max_seq_length)


def split_paths(data_dir: str | Path) -> tuple[Path, Path | None]:
    """(train.jsonl, valid.jsonl or None) of a data folder, or DataError with the fix."""
    d = Path(data_dir)
    if not d.is_dir():
        raise DataError("no such folder", d, fix="pass the folder `mlx-distill prepare --out` wrote")
    if not (d / "train.jsonl").is_file():
        raise DataError("no train.jsonl in this folder", d,
                        fix="run `mlx-distill prepare --teacher-data FILE --out DIR` first")
    valid = d / "valid.jsonl"
    return d / "train.jsonl", (valid if valid.is_file() else None)


@dataclass
class _Opts:
    mask_prompt: bool


def load_data(
    data_dir: str | Path, tokenizer: Any, *, mask_prompt: bool = True, max_seq_length: int = 2048
) -> tuple[TokenizedDataset, TokenizedDataset | None]:
    """(train, valid or None) from an mlx-lm data folder."""
    train_path, valid_path = split_paths(data_dir)
    kw = dict(mask_prompt=mask_prompt, max_seq_length=max_seq_length)
    train = load_split(train_path, tokenizer, **kw)
    return train, (load_split(valid_path, tokenizer, **kw) if valid_path else None)


def batches_per_epoch(num_examples: int, batch_size: int) -> int:
    """ceil(n / batch): 104 examples / batch 4 = 26 steps; 94 / 4 = 24 (the last one has 2 rows)."""
    return math.ceil(num_examples / batch_size)


def iterate_batches(
    dataset: Any,
    batch_size: int,
    max_seq_length: int,
    loop: bool = False,
    seed: int | None = None,
    comm_group: Any = None,
) -> Any:
    """Yield ``(tokens (B/N, W) int32, lengths (B/N, 2) = (offset, length))`` batches.

    Same signature and output as mlx-lm's ``iterate_batches``. Examples are
    sorted by length and cut into fixed batches; the batch *order* is shuffled
    per epoch by ``(seed, epoch)`` (resumable: epoch k's order does not depend
    on earlier draws). Rank r of N takes rows r, r+N, ... of each global batch
    and every rank pads to the global batch's width, so N ranks compute
    exactly the rows (and shapes) one process would.
    """
    import mlx.core as mx

    world = comm_group.size() if comm_group is not None else 1
    rank = comm_group.rank() if comm_group is not None else 0
    if batch_size % world:
        raise ValueError(f"batch size {batch_size} is not divisible by the {world} workers")
    n = len(dataset)
    if n == 0:
        raise ValueError("the dataset is empty")
    lens = [dataset.itemlen(i) if hasattr(dataset, "itemlen") else len(dataset[i][0]) for i in range(n)]
    order = sorted(range(n), key=lambda i: (lens[i], i))
    batches = [order[i:i + batch_size] for i in range(0, n, batch_size)]
    epoch = 0
    while True:
        if seed is None:
            perm = range(len(batches))
        else:
            perm = np.random.default_rng([seed, epoch]).permutation(len(batches))
        for b in perm:
            # A short last batch gets filler rows only up to a multiple of the ranks.
            fill = -len(batches[b]) % world
            rows: list[int | None] = list(batches[b]) + [None] * fill
            longest = max(lens[i] for i in batches[b])
            width = min(1 + PAD_TO * math.ceil(longest / PAD_TO), max_seq_length)
            mine = rows[rank::world]
            arr = np.zeros((len(mine), width), np.int32)
            lengths = np.zeros((len(mine), 2), np.int32)
            for j, i in enumerate(mine):
                if i is None:  # filler row: length 0, so no token of it is in the loss
                    continue
                tokens, offset = dataset[i]
                k = min(len(tokens), width)
                arr[j, :k] = tokens[:k]
                lengths[j] = (offset, k)
            yield mx.array(arr), mx.array(lengths)
        epoch += 1
        if not loop:
            break


def truncated_count(dataset: TokenizedDataset, max_seq_length: int) -> int:
    """How many examples ``max_seq_length`` cuts (reported before training)."""
    return sum(len(t) > max_seq_length for t, _ in dataset.items)
