"""Helpers shared by the export/verify/PEFT tests (no tests of their own).

The project's trainer is written elsewhere; these tests make adapters with
mlx-lm's tuner directly: ``linear_to_lora_layers`` plus real optimizer steps
through ``mlx_lm.tuner.trainer.train``, written in mlx-lm's adapter format.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from tests.helpers import chat_rows


def make_adapter(
    model_dir: Path,
    dest: Path,
    *,
    num_layers: int = 2,
    rank: int = 4,
    scale: float = 10.0,
    iters: int = 4,
    learning_rate: float = 5e-3,
    fine_tune_type: str = "lora",
    keys: list[str] | None = None,
    rows: int = 4,
    extra_config: dict[str, Any] | None = None,
) -> Path:
    """Train a small adapter for real (a few Adam steps) and write it like `mlx_lm lora`.

    A high learning rate matters: LoRA B starts at zero, and a few steps at the
    usual 1e-5 would leave it ~1e-5, too small to show that a fuse kept it.
    """
    import mlx.core as mx
    import mlx.optimizers as optim
    from mlx.utils import tree_flatten
    from mlx_lm.tuner.datasets import CacheDataset, ChatDataset
    from mlx_lm.tuner.trainer import TrainingArgs, train
    from mlx_lm.tuner.utils import linear_to_lora_layers
    from mlx_lm.utils import load

    mx.random.seed(0)
    model, tokenizer = load(str(model_dir))
    model.set_dtype(mx.float32)
    model.freeze()
    lora = {"rank": rank, "scale": scale, "dropout": 0.0}
    if keys is not None:
        lora["keys"] = keys
    if fine_tune_type == "full":
        for layer in model.layers[-num_layers:]:
            layer.unfreeze()
    else:
        linear_to_lora_layers(model, num_layers, lora, use_dora=fine_tune_type == "dora")
    dest.mkdir(parents=True, exist_ok=True)
    data = CacheDataset(ChatDataset(chat_rows(rows), tokenizer))
    args = TrainingArgs(
        batch_size=2, iters=iters, val_batches=1, steps_per_report=1000, steps_per_eval=1000,
        steps_per_save=1000, max_seq_length=128, adapter_file=str(dest / "adapters.safetensors"),
    )
    train(model, optim.Adam(learning_rate=learning_rate), data, data, args)
    # mlx-lm's trainer saves all trainable parameters: the adapter (or full) weights.
    saved = dict(tree_flatten(model.trainable_parameters()))
    assert saved, "nothing was trained"
    config = {
        "model": str(model_dir),
        "fine_tune_type": fine_tune_type,
        "num_layers": num_layers,
        "lora_parameters": lora,
        "iters": iters,
        "batch_size": 2,
        "learning_rate": learning_rate,
        "max_seq_length": 128,
        **(extra_config or {}),
    }
    (dest / "adapter_config.json").write_text(json.dumps(config, indent=2))
    return dest


def lora_b_norm(adapter_dir: Path) -> float:
    """Largest |lora_b| in an adapter file (0 means the adapter does nothing)."""
    import mlx.core as mx

    w = mx.load(str(adapter_dir / "adapters.safetensors"))
    return max(float(mx.abs(v).max()) for k, v in w.items() if k.endswith("lora_b"))
