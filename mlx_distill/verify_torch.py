"""The transformers side of ``verify`` (torch CPU, fp32): loading an export, its logits and greedy tokens.

torch and transformers are optional extras: :func:`torch_available` says
what is missing, and nothing here imports them at module load.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from mlx_distill.errors import VerificationError


def torch_available(need: Sequence[str] = ("torch", "transformers")) -> str | None:
    """None when every package is importable, else a notice naming what is missing."""
    missing = [m for m in need if importlib.util.find_spec(m) is None]
    if not missing:
        return None
    return f"skipped: {' and '.join(missing)} not installed (pip install torch transformers peft)"


def hf_load(folder: str | Path) -> Any:
    """transformers model in fp32 on CPU; missing/unexpected keys are a failure."""
    import torch
    import transformers
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    kw = {"dtype": torch.float32} if int(transformers.__version__.split(".")[0]) >= 5 else {
        "torch_dtype": torch.float32}
    hf_logging.disable_progress_bar()
    try:
        model, info = AutoModelForCausalLM.from_pretrained(str(folder), output_loading_info=True, **kw)
    finally:
        hf_logging.enable_progress_bar()
    bad = {k: sorted(v) for k, v in info.items()
           if k in ("missing_keys", "unexpected_keys", "mismatched_keys") and v}
    if bad:
        raise VerificationError(
            f"{folder}: transformers loaded the weights with problems: {bad}. The folder's tensor "
            "names do not match the architecture in config.json."
        )
    return model.eval()


def torch_logits(model: Any, ids_list: Sequence[Sequence[int]]) -> list[Any]:
    import torch

    with torch.no_grad():
        return [model(torch.tensor([list(ids)])).logits[0].float().numpy() for ids in ids_list]


def torch_greedy(model: Any, ids: Sequence[int], n: int, stop: set[int]) -> list[int]:
    """The same greedy loop in torch (the cache argument is ``cache`` in transformers 5.2x,
    ``past_key_values`` before)."""
    import inspect

    import torch

    key = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
    out: list[int] = []
    with torch.no_grad():
        res = model(torch.tensor([list(ids)]), use_cache=True)
        for _ in range(n):
            tok = int(res.logits[0, -1].argmax())
            out.append(tok)
            if tok in stop:
                break
            res = model(torch.tensor([[tok]]), use_cache=True, **{key: getattr(res, key)})
    return out
