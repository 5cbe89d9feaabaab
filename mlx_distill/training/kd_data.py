"""KD data: vocabulary check, teacher/student answer alignment, and batches with the teacher's side.

Context distillation: the teacher answers under its own context (the demo
teacher's ~230-token style prompt), the student sees the plain prompt. Both
rows end with the same answer tokens, so the teacher's logit at position
``a_t - 1 + r`` and the student's at ``a_s - 1 + r`` predict the same answer
token r (``a`` = where the answer starts in each row)::

    student  [sys* user        | answer tokens ... <|im_end|> \\n]   a_s = 32
    teacher  [sys: style (226) | user | answer tokens ... <|im_end|> \\n]  a_t = 248

The answer tokens must be the same ids in both rows; a chat template that
renders the assistant turn differently under another system prompt fails here,
with the file and line, before any compute.

Batches: :class:`KDBatches` wraps any ``iterate_batches`` (mlx-lm's
signature) and finds each row's example by its tokens, so it does not depend on
how the base iterator orders, pads or splits rows over ranks.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from mlx_distill.errors import ConfigError, DataError, DistillError


@dataclass
class Aligned:
    """One example's student and teacher rows, cut to the same answer tokens."""

    length: int  # student tokens kept (min(len, --max-seq-length))
    answer_start: int  # a_s: index of the first answer token in the student row
    teacher_tokens: list[int]  # the teacher's row, ending where the kept student row ends
    teacher_answer_start: int  # a_t

    @property
    def shift(self) -> int:
        return self.teacher_answer_start - self.answer_start

    @property
    def targets(self) -> int:
        """Answer tokens in the KL: positions max(a_s, 1) .. length - 1."""
        return max(self.length - max(self.answer_start, 1), 0)


def output_rows(model: Any) -> int:
    """Rows of the model's output layer (its logits' last dimension)."""
    args = getattr(model, "args", None)
    n = getattr(args, "vocab_size", None)
    if isinstance(n, int) and n > 0:
        return n
    embed = getattr(getattr(model, "model", None), "embed_tokens", None)
    if embed is not None and hasattr(embed, "weight"):
        return int(embed.weight.shape[0])
    raise ConfigError("cannot tell the model's vocabulary size (no args.vocab_size, no embed_tokens)")


def check_vocab(student: Any, student_tok: Any, teacher: Any, teacher_tok: Any, *, student_name: str,
                teacher_name: str) -> int:
    """The number of logit rows both models share, or ConfigError before any compute.

    Identical tokenizers are required. Output layers may differ only by padding
    rows past the last token id (Qwen2.5: tokenizer 151,665 ids, 0.5B/1.5B
    151,936 rows, 7B 152,064): those rows are sliced off.
    """
    vs, vt = student_tok.get_vocab(), teacher_tok.get_vocab()
    fix = ("KD compares token distributions, so teacher and student need the same tokenizer: pick a teacher "
           "of the student's family, or distil from its text with `mlx-distill collect` and --loss sft")
    if vs != vt:
        inv_s = {i: t for t, i in vs.items()}
        inv_t = {i: t for t, i in vt.items()}
        diff = next((i for i in sorted(set(inv_s) | set(inv_t)) if inv_s.get(i) != inv_t.get(i)), None)
        raise ConfigError(
            f"--teacher-model {teacher_name}: its tokenizer has {len(vt):,} tokens and the student's "
            f"({student_name}) {len(vs):,}; they differ at id {diff} (student {inv_s.get(diff)!r}, teacher "
            f"{inv_t.get(diff)!r}). {fix}")
    ids = max(vs.values()) + 1
    rows_s, rows_t = output_rows(student), output_rows(teacher)
    for name, rows in ((student_name, rows_s), (teacher_name, rows_t)):
        if rows < ids:
            raise ConfigError(
                f"{name} has {rows:,} output rows but its tokenizer uses ids up to {ids - 1:,}: the "
                f"vocabularies are not the same ({student_name}: {rows_s:,} rows, {teacher_name}: "
                f"{rows_t:,} rows). {fix}")
    return min(rows_s, rows_t)


def messages_of(row: dict[str, Any], path: Path, line: int) -> list[dict[str, Any]]:
    """The chat of a training row (chat or prompt/completion format), as mlx-lm builds it."""
    if "prompt" in row and "completion" in row:
        return [{"role": "user", "content": row["prompt"]}, {"role": "assistant", "content": row["completion"]}]
    if "messages" in row:
        return list(row["messages"])
    raise DataError("--loss kd needs a prompt and an answer, but this is a plain 'text' record", path, line,
                    fix="use chat ({'messages': [...]}) or prompt/completion records, or --loss sft")


def teacher_messages(messages: list[dict[str, Any]], system: str | None) -> list[dict[str, Any]]:
    """The teacher's context: its own system prompt instead of the student's (None: the same chat)."""
    if system is None:
        return messages
    return [{"role": "system", "content": system}] + [m for m in messages if m.get("role") != "system"]


def _template(tok: Any, messages: list[dict[str, Any]], tools: Any, prompt: bool = False) -> list[int]:
    kw = {"add_generation_prompt": True} if prompt else {}
    return list(tok.apply_chat_template(messages, tools=tools, return_dict=False, **kw))


def align_split(path: Path, rows: list[dict[str, Any]], lines: list[int], items: list[tuple[list[int], int]],
                student_tok: Any, teacher_tok: Any, system: str | None, max_seq_length: int) -> list[Aligned]:
    """Align every example of one split (``items``: the student's tokenized rows, in order)."""
    out = []
    for row, line, (tokens, _) in zip(rows, lines, items):
        msgs = messages_of(row, path, line)
        tools = row.get("tools")
        a_s = len(_template(student_tok, msgs[:-1], tools, prompt=True))
        t_msgs = teacher_messages(msgs, system)
        t_full = _template(teacher_tok, t_msgs, tools)
        a_t = len(_template(teacher_tok, t_msgs[:-1], tools, prompt=True))
        s_ans, t_ans = list(tokens[a_s:]), t_full[a_t:]
        if s_ans != t_ans:
            r = next((i for i, (x, y) in enumerate(zip(s_ans, t_ans)) if x != y), min(len(s_ans), len(t_ans)))
            s_at, t_at = s_ans[r:r + 4], t_ans[r:r + 4]
            raise DataError(
                f"the answer tokenizes differently in the teacher's context: {len(s_ans)} answer tokens for "
                f"the student, {len(t_ans)} for the teacher, first difference at answer token {r}: student "
                f"{student_tok.decode(s_at)!r} (ids {s_at}), teacher {student_tok.decode(t_at)!r} (ids {t_at})",
                path, line,
                fix="KD aligns the teacher's logits to the answer tokens, so the chat template must render "
                    "the assistant turn the same whatever the system prompt; check --teacher-system, or pass "
                    "--teacher-system '' to give the teacher the student's own context")
        length = min(len(tokens), max_seq_length)
        out.append(Aligned(length, a_s, t_full[: a_t + max(length - a_s, 0)], a_t))
    return out


class KDSplit:
    """One split's examples, found by their tokens, with the teacher side of each batch row."""

    def __init__(self, items: list[tuple[list[int], int]], aligned: list[Aligned], cache: Any = None):
        self.items, self.aligned, self.cache = items, aligned, cache
        self.max_shift = max(a.shift for a in aligned)
        self._index: dict[bytes, int] = {}
        for i, (tokens, _) in enumerate(items):
            self._index.setdefault(_key(tokens[: aligned[i].length]), i)

    def find(self, row: np.ndarray) -> int:
        """The example whose (kept) tokens a batch row holds, or DistillError."""
        i = self._index.get(_key(row))
        if i is None:  # the base iterator cut the row shorter than --max-seq-length: match the prefix
            n = len(row)
            i = next((j for j, (t, _) in enumerate(self.items) if len(t) >= n and list(t[:n]) == row.tolist()), None)
            if i is None:
                raise DistillError("a training batch row matches no example of its split: the batch iterator "
                                   "changed the rows (packing?), but KD needs whole examples to align the "
                                   "teacher's logits")
            self._index[_key(row)] = i
        return i

    def _rows(self, tokens: np.ndarray, lengths: np.ndarray) -> Iterator[tuple[int, Aligned, int]]:
        """(batch row, aligned example, KD targets in this row) for the real rows of a batch."""
        for j in range(tokens.shape[0]):
            k = int(lengths[j, 1])
            if k == 0:  # filler row (nothing in the loss)
                continue
            a = self.aligned[self.find(tokens[j, :k])]
            yield j, a, max(k - max(a.answer_start, 1), 0)

    def online(self, tokens: np.ndarray, lengths: np.ndarray) -> tuple[Any, ...]:
        """(t_tokens (B, W + max_shift), t_pos (B, W - 1), kd_mask (B, W - 1)) for :class:`KDLoss`.

        The teacher width is the student's plus the split's largest context shift,
        so every rank (and one process) computes the same shapes for one batch.
        """
        import mlx.core as mx

        b, w = tokens.shape
        wt = max(w + self.max_shift, 1)
        t_tokens = np.zeros((b, wt), np.int32)
        t_pos = np.zeros((b, w - 1), np.int32)
        mask = np.zeros((b, w - 1), np.float32)
        for j, a, n in self._rows(tokens, lengths):
            row = a.teacher_tokens
            t_tokens[j, : len(row)] = row
            p0 = max(a.answer_start, 1) - 1  # student logit predicting the first answer target
            t_pos[j, p0:p0 + n] = np.arange(p0, p0 + n) + a.shift
            mask[j, p0:p0 + n] = 1.0
        return mx.array(t_tokens), mx.array(t_pos), mx.array(mask)

    def cached(self, tokens: np.ndarray, lengths: np.ndarray) -> tuple[Any, ...]:
        """(top_idx (B, W - 1, K), top_logp, tail_logp (B, W - 1), kd_mask) from the top-K cache."""
        import mlx.core as mx

        b, w = tokens.shape
        k = self.cache.k
        idx = np.zeros((b, w - 1, k), np.int32)
        logp = np.zeros((b, w - 1, k), np.float32)
        tail = np.zeros((b, w - 1), np.float32)
        mask = np.zeros((b, w - 1), np.float32)
        for j, a, n in self._rows(tokens, lengths):
            e_idx, e_logp, e_tail = self.cache.example(self.find(tokens[j, : int(lengths[j, 1])]))
            p0 = max(a.answer_start, 1) - 1
            idx[j, p0:p0 + n], logp[j, p0:p0 + n], tail[j, p0:p0 + n] = e_idx[:n], e_logp[:n], e_tail[:n]
            mask[j, p0:p0 + n] = 1.0
        return mx.array(idx), mx.array(logp), mx.array(tail), mx.array(mask)


def _key(tokens: Any) -> bytes:
    return np.asarray(tokens, dtype=np.int32).tobytes()


class KDBatches:
    """An ``iterate_batches`` that appends the teacher's side to each (tokens, lengths) batch."""

    def __init__(self, base: Callable[..., Any], splits: list[tuple[Any, KDSplit]], cached: bool):
        self.base, self.splits, self.cached = base, splits, cached

    def split_for(self, dataset: Any) -> KDSplit:
        for ds, split in self.splits:
            if ds is dataset:
                return split
        raise DistillError("KD batches were asked for a dataset that was not aligned with the teacher")

    def __call__(self, dataset: Any, batch_size: int, max_seq_length: int, loop: bool = False,
                 seed: int | None = None, comm_group: Any = None) -> Iterator[tuple[Any, ...]]:
        split = self.split_for(dataset)
        make = split.cached if self.cached else split.online
        for batch in self.base(dataset=dataset, batch_size=batch_size, max_seq_length=max_seq_length, loop=loop,
                               seed=seed, comm_group=comm_group):
            if len(batch) != 2:
                raise DistillError(f"--loss kd expects (tokens, lengths) batches, got {len(batch)} arrays")
            tokens, lengths = batch
            yield (tokens, lengths, *make(np.array(tokens), np.array(lengths)))
