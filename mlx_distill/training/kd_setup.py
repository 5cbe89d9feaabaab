"""Wiring for ``mlx-distill train --loss kd``: checks, the teacher, alignment, the cache, the loss.

Everything here runs before the first training step, so a wrong teacher, a
vocabulary mismatch or an answer that does not align fails before any compute
(the top-K cache build excepted, which is the teacher's one pass over the data).
The result plugs into the trainer's two swap points: ``loss`` and
``iterate_batches``.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mlx_distill.errors import ConfigError
from mlx_distill.training.kd import KINDS, KDLoss
from mlx_distill.training.kd_data import KDBatches, KDSplit, align_split, check_vocab, output_rows

KD_FLAGS = ("teacher_model", "teacher_system", "kd_top_k")
KIND_LABELS = {"forward": "forward KL(teacher||student)", "reverse": "reverse KL(student||teacher)",
               "jsd": "Jensen-Shannon"}


def check_kd_config(cfg: Any) -> None:
    """Flag KD options that cannot work, before anything is loaded."""
    if cfg.loss != "kd":
        given = [f"--{n.replace('_', '-')}" for n in KD_FLAGS if getattr(cfg, n, None) is not None]
        if given:
            raise ConfigError(f"{', '.join(given)} only apply to --loss kd (got --loss {cfg.loss}); add --loss kd "
                              "or drop them")
        return
    if not cfg.teacher_model:
        raise ConfigError("--loss kd needs --teacher-model: a local model with the student's tokenizer "
                          "(`demo` is the embedded SmolLM2 under the demo teacher's style prompt)")
    if not 0.0 <= cfg.kd_ratio <= 1.0:
        raise ConfigError(f"--kd-ratio {cfg.kd_ratio}: expected a weight in [0, 1] "
                          "(loss = (1 - ratio) * CE + ratio * KL)")
    if not cfg.kd_temperature > 0:
        raise ConfigError(f"--kd-temperature {cfg.kd_temperature}: expected a positive number (1.0: the "
                          "distributions as they are; 2.0: softer)")
    if cfg.kd_kind not in KINDS:
        raise ConfigError(f"--kd-kind {cfg.kd_kind!r}: expected one of {', '.join(KINDS)}")
    if cfg.kd_top_k is not None and cfg.kd_top_k < 1:
        raise ConfigError(f"--kd-top-k {cfg.kd_top_k}: expected a positive K (e.g. 32), or leave it out for "
                          "the full vocabulary on the fly")


def teacher_spec(cfg: Any) -> str:
    """``--teacher-model`` as a model spec (``local:X`` as ``collect`` writes it means X)."""
    spec = cfg.teacher_model
    return spec[len("local:"):] if spec.startswith("local:") else spec


def teacher_system(cfg: Any) -> str | None:
    """The teacher's system prompt: the flag (``@file`` read), else the style prompt for ``demo``.

    ``--teacher-system ''`` gives the teacher the student's own context (plain KD).
    """
    from mlx_distill.generate import read_text_arg

    if cfg.teacher_system is not None:
        text = read_text_arg(cfg.teacher_system)
        return (text.strip() or None) if text is not None else None
    if teacher_spec(cfg) == "demo":
        from mlx_distill.teachers import style_prompt

        return style_prompt()
    return None


def kd_fingerprint(cfg: Any) -> dict[str, Any]:
    """What a resumed KD run must share with its checkpoint (``loss`` is None for SFT, so older
    SFT checkpoints, which have no such key, still resume)."""
    if cfg.loss != "kd":
        return {"loss": None}
    system = teacher_system(cfg)
    return {"loss": "kd", "teacher_model": cfg.teacher_model, "kd_ratio": cfg.kd_ratio,
            "kd_temperature": cfg.kd_temperature, "kd_kind": cfg.kd_kind, "kd_top_k": cfg.kd_top_k,
            "teacher_system_sha256": hashlib.sha256(system.encode()).hexdigest()[:16] if system else None}


@dataclass
class KDSetup:
    loss: KDLoss
    iterate_batches: KDBatches
    info: dict[str, Any] = field(default_factory=dict)  # recorded in adapter_config.json under "kd"


@dataclass
class SplitData:
    """One split as the trainer holds it: file, parsed rows, their lines, the tokenized dataset."""

    name: str
    path: Path
    rows: list[dict[str, Any]]
    lines: list[int]
    dataset: Any


def _barrier(group: Any) -> Callable[[bool], bool]:
    def barrier(ok: bool) -> bool:
        import mlx.core as mx

        if group.size() == 1:
            return ok
        total = mx.distributed.all_sum(mx.array(1.0 if ok else 0.0), group=group)
        return bool(total.item() == group.size())

    return barrier


def setup_kd(cfg: Any, student: Any, tokenizer: Any, student_name: str, splits: list[SplitData], *,
             base_iterate: Callable[..., Any], group: Any, loader: Callable[..., Any],
             echo: Callable[[str], None] = print) -> KDSetup:
    """Load the frozen teacher, check the vocabulary, align every split, build or reuse the cache."""
    from mlx_distill.training.teacher_cache import (
        cache_key,
        cache_path,
        compute_cache,
        ensure_cache,
    )

    spec = teacher_spec(cfg)
    system = teacher_system(cfg)
    teacher, t_tok, t_info = loader(spec, None, cfg.dtype_policy)
    teacher.freeze()
    teacher.eval()
    vocab = check_vocab(student, tokenizer, teacher, t_tok, student_name=student_name, teacher_name=spec)
    if cfg.kd_top_k is not None and cfg.kd_top_k >= vocab:
        raise ConfigError(f"--kd-top-k {cfg.kd_top_k}: the vocabulary has {vocab:,} tokens; pick K < {vocab:,} "
                          "(e.g. 32), or leave it out for the full distribution")
    aligned = {s.name: align_split(s.path, s.rows, s.lines, s.dataset.items, tokenizer, t_tok, system,
                                   cfg.max_seq_length) for s in splits}
    _check_context(teacher, spec, splits, aligned)
    train_al = aligned[splits[0].name]
    shift = max(a.shift for a in train_al)
    targets = sum(a.targets for a in train_al)
    rows_s, rows_t = output_rows(student), output_rows(teacher)
    echo(f"kd: teacher {spec} ({t_info.path}), {KIND_LABELS[cfg.kd_kind]}, ratio {cfg.kd_ratio}, "
         f"temperature {cfg.kd_temperature}, "
         + (f"top-{cfg.kd_top_k} cache" if cfg.kd_top_k else "full vocabulary on the fly")
         + f"; {targets:,} answer tokens in train"
         + (f"; teacher context: its own system prompt ({shift:+d} tokens)" if system else "; same context")
         + (f"; vocabulary {vocab:,} (padding rows sliced: student {rows_s:,}, teacher {rows_t:,})"
            if rows_s != rows_t else ""))
    info: dict[str, Any] = {"teacher": spec, "teacher_path": t_info.path, "vocab": vocab,
                            "teacher_system_sha256": kd_fingerprint(cfg)["teacher_system_sha256"],
                            "kind": cfg.kd_kind, "ratio": cfg.kd_ratio, "temperature": cfg.kd_temperature,
                            "top_k": cfg.kd_top_k}
    kd_splits = []
    rank0 = group.rank() == 0
    for s in splits:
        cache = None
        if cfg.kd_top_k:
            al = aligned[s.name]
            key = cache_key(teacher_path=t_info.path, k=cfg.kd_top_k, temperature=cfg.kd_temperature,
                            vocab=vocab, aligned=al)
            path = cache_path(s.path.parent, s.name, key)
            meta = {"teacher": spec, "split": s.name, "key": key, "examples": len(al)}
            cache = ensure_cache(
                path, lambda al=al, meta=meta: compute_cache(teacher, al, k=cfg.kd_top_k,
                                                             temperature=cfg.kd_temperature, vocab=vocab,
                                                             batch_size=max(cfg.batch_size, 1), meta=meta),
                examples=len(al), k=cfg.kd_top_k, rank0=rank0, barrier=_barrier(group), echo=echo)
            info.setdefault("cache", {})[s.name] = str(path)
        kd_splits.append((s.dataset, KDSplit(s.dataset.items, aligned[s.name], cache)))
    cached = cfg.kd_top_k is not None
    loss = KDLoss(ratio=cfg.kd_ratio, temperature=cfg.kd_temperature, kind=cfg.kd_kind,
                  vocab=None if rows_s == rows_t else vocab, teacher=None if cached else teacher)
    return KDSetup(loss, KDBatches(base_iterate, kd_splits, cached), info)


def _check_context(teacher: Any, spec: str, splits: list[SplitData], aligned: dict[str, list[Any]]) -> None:
    limit = getattr(getattr(teacher, "args", None), "max_position_embeddings", None)
    if not isinstance(limit, int) or limit <= 0:
        return
    for s in splits:
        for a, line in zip(aligned[s.name], s.lines):
            if len(a.teacher_tokens) > limit:
                raise ConfigError(f"{s.path}:{line}: the teacher's row is {len(a.teacher_tokens):,} tokens (its "
                                  f"context + the answer), more than {spec}'s context of {limit:,}; lower "
                                  "--max-seq-length or shorten --teacher-system")
