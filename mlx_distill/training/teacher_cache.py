"""The top-K teacher cache (``--kd-top-k K``): computed once, stored next to the data, reused.

Per answer token the teacher's K most likely token ids (int32), their
log-probs (fp16) and the log of the remaining mass (fp32): K x (4 + 2) + 4
bytes, 196 bytes a token at K = 32. 100 examples x 300 answer tokens = 5.9 MB,
against 5.9 GB for full fp32 logits over SmolLM2's 49,152 tokens. The teacher
then runs once per example instead of once per example per epoch (5 epochs:
5x fewer teacher forwards, and none with its long context inside the step).

Layout: ``DATA/kd-cache/{split}-{key}.safetensors`` with arrays ``idx`` (N, K),
``logp`` (N, K), ``tail`` (N,), ``offsets`` (E + 1,) (example e owns rows
``offsets[e]:offsets[e + 1]``, in the split's file order) and the metadata.
``key`` hashes everything that determines the numbers: the teacher's weights
(path, size, mtime), K, the temperature, the shared vocabulary and every
example's teacher row; change any and a new file is built, the old one stays.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from mlx_distill.errors import DataError, DistillError
from mlx_distill.training.kd_data import Aligned

VERSION = 1
CACHE_DIR = "kd-cache"
BYTES_PER_TOKEN = "K x (4 + 2) + 4"


@dataclass
class TopKCache:
    idx: np.ndarray  # (N, K) int32 token ids, by descending probability
    logp: np.ndarray  # (N, K) float16 log-probs at the cache's temperature
    tail: np.ndarray  # (N,) float32 log of the mass outside the top K
    offsets: np.ndarray  # (E + 1,) int64
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def k(self) -> int:
        return int(self.idx.shape[1])

    @property
    def tokens(self) -> int:
        return int(self.idx.shape[0])

    @property
    def nbytes(self) -> int:
        return self.idx.nbytes + self.logp.nbytes + self.tail.nbytes + self.offsets.nbytes

    def example(self, e: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        a, b = int(self.offsets[e]), int(self.offsets[e + 1])
        return self.idx[a:b], self.logp[a:b], self.tail[a:b]


def file_identity(path: str | Path) -> list[Any]:
    """(name, size, mtime) of a model folder's weight and config files: a change means new numbers."""
    p = Path(path)
    files = sorted(f for f in p.iterdir() if f.suffix in (".safetensors", ".json", ".gguf")) if p.is_dir() else [p]
    return [[f.name, f.stat().st_size, f.stat().st_mtime_ns] for f in files if f.is_file()]


def cache_key(*, teacher_path: str, k: int, temperature: float, vocab: int, aligned: list[Aligned]) -> str:
    """16 hex digits of a SHA-256 over everything that determines the cache's numbers."""
    h = hashlib.sha256()
    h.update(json.dumps({"v": VERSION, "teacher": file_identity(teacher_path), "k": k,
                         "temperature": temperature, "vocab": vocab}, sort_keys=True).encode())
    for a in aligned:
        h.update(np.asarray([a.teacher_answer_start, a.answer_start, a.length], np.int64).tobytes())
        h.update(np.asarray(a.teacher_tokens, np.int32).tobytes())
    return h.hexdigest()[:16]


def cache_path(data_dir: str | Path, split: str, key: str) -> Path:
    return Path(data_dir) / CACHE_DIR / f"{split}-{key}.safetensors"


def save_cache(path: str | Path, cache: TopKCache) -> Path:
    """Write atomically (temp file in the same folder, fsync, rename)."""
    import mlx.core as mx

    from mlx_distill.training.checkpoint import save_safetensors_atomic

    arrays = {"idx": mx.array(cache.idx), "logp": mx.array(cache.logp), "tail": mx.array(cache.tail),
              "offsets": mx.array(cache.offsets.astype(np.int64))}
    return save_safetensors_atomic(path, arrays, metadata={"mlx_distill_kd_cache": json.dumps(cache.meta)})


def load_cache(path: str | Path) -> TopKCache:
    """Read a cache file; DataError naming the file and the fix if it is not one."""
    import mlx.core as mx

    p = Path(path)
    fix = "delete it; the next `mlx-distill train --loss kd --kd-top-k K` rebuilds it"
    try:
        arrays, metadata = mx.load(str(p), return_metadata=True)
        meta = json.loads(metadata["mlx_distill_kd_cache"])
        cache = TopKCache(np.array(arrays["idx"]), np.array(arrays["logp"]), np.array(arrays["tail"]),
                          np.array(arrays["offsets"]), meta)
    except (KeyError, ValueError, RuntimeError, OSError) as e:
        raise DataError(f"not a readable KD teacher cache ({type(e).__name__}: {e})", p, fix=fix) from None
    n = cache.tokens
    if (cache.logp.shape != cache.idx.shape or cache.tail.shape != (n,) or cache.offsets[-1] != n
            or meta.get("version") != VERSION):
        raise DataError(f"inconsistent KD teacher cache (idx {cache.idx.shape}, logp {cache.logp.shape}, tail "
                        f"{cache.tail.shape}, {cache.offsets[-1]} rows by offsets, version {meta.get('version')})",
                        p, fix=fix)
    return cache


def shared_prefix(teacher: Any, aligned: list[Aligned]) -> tuple[int, list[tuple[Any, Any]] | None]:
    """Prefill the teacher rows' common prefix (its system prompt) once: (length, per-layer K/V).

    The demo teacher's rows all start with the same ~250 template + style-prompt
    tokens, ~45% of a 560-token row; computing them once saves that share of
    the cache build. (0, None) when the prefix is short or the model's cache is
    not a plain KVCache (rotating/quantized caches keep the simple path).
    """
    import mlx.core as mx
    from mlx_lm.models.cache import KVCache, make_prompt_cache

    from mlx_distill.lookup import shared_prefix as common_length

    rows = [a.teacher_tokens for a in aligned if a.targets > 0]
    if len(rows) < 2:
        return 0, None
    # Stop before the first position whose logits are needed (a_t - 1 predicts the first answer token).
    limit = min(max(a.answer_start, 1) - 1 + a.shift for a in aligned if a.targets > 0)
    n = common_length(rows, limit=limit)
    if not n:
        return 0, None
    first = rows[0]
    cache = make_prompt_cache(teacher)
    if not all(type(c) is KVCache for c in cache):
        return 0, None
    teacher(mx.array([first[:n]]), cache=cache)
    kv = [c.keys_and_values() for c in cache]
    mx.eval(kv)
    return n, kv


def _prefixed(kv: list[tuple[Any, Any]], n: int, batch: int) -> list[Any]:
    import mlx.core as mx
    from mlx_lm.models.cache import KVCache

    caches = []
    for keys, values in kv:
        c = KVCache()
        c.state = (mx.repeat(keys, batch, axis=0), mx.repeat(values, batch, axis=0), n)
        caches.append(c)
    return caches


def compute_cache(teacher: Any, aligned: list[Aligned], *, k: int, temperature: float, vocab: int,
                  batch_size: int = 8, meta: dict[str, Any] | None = None, share_prefix: bool = True,
                  progress: Callable[[int, int], None] | None = None) -> TopKCache:
    """Run the teacher once over every example and keep its top-K per answer token.

    Rows are sorted by length and padded on the right (causal attention: padding
    after a row does not change its logits), ``batch_size`` at a time, after
    the shared prefix (:func:`shared_prefix`) is computed once.
    """
    import mlx.core as mx

    from mlx_distill.training.kd import log_softmax, teacher_topk

    n_targets = [a.targets for a in aligned]
    offsets = np.zeros(len(aligned) + 1, np.int64)
    offsets[1:] = np.cumsum(n_targets)
    idx = np.zeros((int(offsets[-1]), k), np.int32)
    logp = np.zeros((int(offsets[-1]), k), np.float16)
    tail = np.zeros(int(offsets[-1]), np.float32)
    order = sorted(range(len(aligned)), key=lambda i: len(aligned[i].teacher_tokens))
    order = [i for i in order if n_targets[i] > 0]
    n_pre, kv = shared_prefix(teacher, aligned) if share_prefix else (0, None)
    done = 0
    for s in range(0, len(order), batch_size):
        chunk = order[s:s + batch_size]
        width = max(len(aligned[i].teacher_tokens) for i in chunk)
        rows = np.zeros((len(chunk), width), np.int32)
        for j, i in enumerate(chunk):
            rows[j, : len(aligned[i].teacher_tokens)] = aligned[i].teacher_tokens
        if kv is not None:
            logits = teacher(mx.array(rows[:, n_pre:]), cache=_prefixed(kv, n_pre, len(chunk)))
        else:
            logits = teacher(mx.array(rows))
        picked = []
        for j, i in enumerate(chunk):
            a = aligned[i]
            p0 = max(a.answer_start, 1) - 1 + a.shift - n_pre  # the logit predicting the first answer target
            picked.append(logits[j, p0:p0 + n_targets[i], :vocab])
        lp = log_softmax(mx.concatenate(picked, axis=0), temperature)
        top_i, top_v, top_tail = teacher_topk(lp, k)
        mx.eval(top_i, top_v, top_tail)
        pos = 0
        for i in chunk:
            a, b = int(offsets[i]), int(offsets[i + 1])
            idx[a:b] = np.array(top_i[pos:pos + b - a])
            logp[a:b] = np.array(top_v[pos:pos + b - a]).astype(np.float16)
            tail[a:b] = np.array(top_tail[pos:pos + b - a])
            pos += b - a
        done += len(chunk)
        if progress is not None:
            progress(done, len(order))
    return TopKCache(idx, logp, tail, offsets, {**(meta or {}), "version": VERSION, "k": k,
                                                  "temperature": temperature, "vocab": vocab})


def ensure_cache(path: Path, build: Callable[[], TopKCache], *, examples: int, k: int, rank0: bool = True,
                 barrier: Callable[[bool], bool] | None = None, echo: Callable[[str], None] = print) -> TopKCache:
    """Load ``path`` if it exists, else build and save it (rank 0 only; the others wait, then load).

    ``barrier(ok) -> all_ok`` synchronises the ranks after rank 0's build, so a
    failed build stops every rank instead of leaving them waiting.
    """
    ok, error = True, None
    if not path.is_file():
        if rank0:
            t0 = time.perf_counter()
            try:
                cache = build()
                save_cache(path, cache)
                echo(f"kd: top-{k} teacher cache {path} written: {cache.tokens:,} answer tokens of "
                     f"{examples} examples, {cache.nbytes / 1e6:.1f} MB, {time.perf_counter() - t0:.1f} s")
            except PermissionError as e:
                ok, error = False, DistillError(f"cannot write the KD teacher cache {path}: {e}. Make the data "
                                                "folder writable, or copy it somewhere writable")
            except BaseException as e:  # stop the other ranks too, then re-raise
                ok, error = False, e
    else:
        echo(f"kd: reusing the top-{k} teacher cache {path}")
    # Every rank passes the barrier exactly once, whether or not it saw the file.
    if barrier is not None and not barrier(ok) and error is None:
        raise DistillError("rank 0 failed to build the KD teacher cache; see its error above")
    if error is not None:
        raise error
    cache = load_cache(path)
    if len(cache.offsets) != examples + 1 or cache.k != k:
        raise DataError(f"the cache holds {len(cache.offsets) - 1} examples at K={cache.k}, expected {examples} "
                        f"at K={k}", path, fix="delete it; it is rebuilt on the next run")
    return cache
