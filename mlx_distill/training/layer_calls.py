"""Give a model's decoder layers another ``__call__`` for the length of a block, and take it back.

``training.streams`` (each half of the batch on its own CPU stream) and
``training.prefix`` (the frozen layers' stored output) both change what a
layer's call does during a training loop. Python looks ``__call__`` up on the
class, so each layer's class is swapped for a cached subclass whose call is
``make_call(base)``, and restored on exit; the layer objects, their weights
and the module tree stay as they are. Swaps nest (the subclass of a subclass).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

_CLASSES: dict[tuple[str, type], type] = {}


@contextmanager
def swapped_calls(layers: Sequence[Any], tag: str, make_call: Callable[[type], Callable[..., Any]]) -> Iterator[None]:
    """Within the block, each of ``layers`` is called through ``make_call(its class)``; ``tag`` names the swap."""
    saved = [type(layer) for layer in layers]
    try:
        for layer, base in zip(layers, saved):
            if (tag, base) not in _CLASSES:
                _CLASSES[tag, base] = type(base.__name__, (base,),
                                           {"__call__": make_call(base), "__module__": base.__module__})
            layer.__class__ = _CLASSES[tag, base]
        yield
    finally:
        for layer, cls in zip(layers, saved):
            layer.__class__ = cls
