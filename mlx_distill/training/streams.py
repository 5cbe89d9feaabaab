"""Training on the CPU with the batch split in two halves, one MLX stream (one thread) each.

Why: MLX 0.32 runs every op of a stream on that stream's one thread, so on
the CPU only the matmuls (MKL or OpenBLAS) use the second core; the softmaxes, the
SwiGLU, the norms and the loss run on one. Each MLX stream has a thread of
its own. Within :func:`two_streams`, every decoder layer runs the first half
of the batch's rows on the default CPU stream and the second half on a
second one (the halves are joined again after each layer), the lm_head +
cross-entropy splits its positions the same way, the fast ops' hand-written
gradients run on their half's stream (``fastops.on_stream``), and the BLAS is
set to half the cores (:func:`threads_per_stream`: one thread on 2 cores), so
that the two halves' matmuls do not oversubscribe the cores. Measured on 2
cores only. Each row goes through the same ops as on one stream: the same losses
and weights (``tests/test_fastops.py``).

Measured on the 2-core box (2026-11-28, the demo student, LoRA on 16 of 30
layers; docs/benchmarks.md): training 217.5 -> 272.4 tok/s (``bench_train``,
best of two rounds), with ``--grad-checkpoint`` 197.8 tok/s (177.7 on one
stream in an earlier run that day); the 30
layers' forward at 4 x 353 tokens 2395 -> 2182 ms (``bench_cpu_ops``).
Calling the whole model once per half on two streams gained nothing (the two
graphs did not overlap), nor did splitting only the attention softmax.

The second stream's elementwise chains in the fast ops run on 1-D views
(``fastops.flat_on_second``): ``mx.compile`` merges the two halves' identical
constant broadcasts into one node on the first stream, and the second
stream's kernels would read it as a stride-0 input, which MLX compiles as an
unvectorized strided loop (2026-12-04, 2-core AMD EPYC: 1.03-1.13x the
training step across three runs, ``bench_train`` way ``mlx-no-flat``).

Not applied to batches of one row or with a KV cache; packed rows
(``--pack``) are split too, each half with its rows' segment ids.
``MLX_DISTILL_CPU_STREAMS=0`` turns it off.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from typing import Any

from mlx_distill.training.layer_calls import swapped_calls

ENV = "MLX_DISTILL_CPU_STREAMS"  # "0": one CPU stream, the BLAS on every core
_state: dict[str, Any] = {"streams": None}


def active_streams() -> list[Any] | None:
    """The two streams while :func:`two_streams` applies, else None."""
    return _state["streams"]


def halves(n: int) -> list[slice]:
    """The first and second half of ``n`` rows (the second gets the odd one)."""
    return [slice(0, n // 2), slice(n // 2, n)]


def _split_call(base: type) -> Any:
    """``base.__call__`` run on each half of the batch, each on its own stream, joined after the layer."""
    from mlx_distill.training import fastops

    def __call__(self: Any, x: Any, *args: Any, **kwargs: Any) -> Any:  # noqa: N807
        import mlx.core as mx

        streams = _state["streams"]
        cache = kwargs.get("cache", args[1] if len(args) > 1 else None)
        if streams is None or cache is not None or x.shape[0] < 2:
            return base.__call__(self, x, *args, **kwargs)
        segments = fastops.packed_segments()  # --pack: (B, T), the whole batch's
        outs = []
        for stream, rows in zip(streams, halves(x.shape[0])):
            # An array mask with a batch axis is the batch's: each half takes its rows.
            a = [m[rows] if hasattr(m, "ndim") and m.ndim == 4 and m.shape[0] == x.shape[0] else m for m in args]
            with ExitStack() as stack:
                stack.enter_context(mx.stream(stream))
                stack.enter_context(fastops.on_stream(stream))
                if segments is not None:
                    stack.enter_context(fastops.attention_segments(self, segments[rows]))
                outs.append(base.__call__(self, x[rows], *a, **kwargs))
        return mx.concatenate(outs, axis=0)

    return __call__


def threads_per_stream(cores: int) -> int:
    """BLAS threads while the two streams run: half the cores each (one on 2 cores)."""
    return max(1, cores // 2)


def _blas_threads(n: int | None) -> int | None:
    """Set the BLAS's thread count (MKL or OpenBLAS, when loaded); return the previous one."""
    from mlx_distill import _blas

    return _blas.set_threads(n)


@contextmanager
def two_streams(model: Any, enabled: bool | None = None) -> Iterator[bool]:
    """Within the block, ``model``'s layers and the chunked lm_head split each batch between two CPU streams.

    Default: on with the fast CPU ops (``fastops.use_fast_ops``) on a
    machine with 2 or more cores. Undone on exit (the layers' classes, the
    BLAS thread count). Yields whether it applied.
    """
    import mlx.core as mx

    from mlx_distill.training.fastops import env_off, use_fast_ops

    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    off = env_off(ENV)
    on = (use_fast_ops() and cores >= 2) if enabled is None else enabled
    layers = list(getattr(model, "layers", None) or [])
    if not on or off or not layers or _state["streams"] is not None:
        yield False
        return
    threads = _blas_threads(threads_per_stream(cores))
    _state["streams"] = [mx.default_stream(mx.cpu), _second_stream()]
    try:
        with swapped_calls(layers, "two_streams", _split_call):
            yield True
    finally:
        _state["streams"] = None
        _blas_threads(threads)


def _second_stream() -> Any:
    """One second CPU stream per process (each MLX stream is a thread that lives as long as the process)."""
    import mlx.core as mx

    if "second" not in _state:
        _state["second"] = mx.new_stream(mx.cpu)
    return _state["second"]
