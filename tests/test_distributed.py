"""Data-parallel training under ``mlx.launch`` on loopback equals one process."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import mlx.core as mx  # conftest imported mlx_distill first (OpenBLAS)
import numpy as np
import pytest


def uneven_data(root: Path) -> Path:
    """8 examples whose answers range from 1 to 22 words, so the two ranks hold different
    token counts: a mean of per-rank means would then differ from one process's mean."""
    root.mkdir(parents=True)
    rows = [{"messages": [{"role": "user", "content": f"question {i}"},
                          {"role": "assistant", "content": " ".join(["word"] * (1 + 3 * i))}]} for i in range(8)]
    (root / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (root / "valid.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows[:3]))
    return root


def train_args(model: Path, data: Path, adapter: Path) -> list[str]:
    return ["-m", "mlx_distill.train", "--model", str(model), "--data", str(data), "--adapter-path", str(adapter),
            "--iters", "2", "--batch-size", "4", "--learning-rate", "1e-3", "--lora-rank", "4", "--no-progress"]


@pytest.mark.slow
def test_two_ranks_match_one_process(tmp_path: Path, tiny_model_dir: Path) -> None:
    launcher = Path(sys.executable).parent / "mlx.launch"
    if not launcher.exists():
        launcher = Path(shutil.which("mlx.launch") or "mlx.launch")
    data = uneven_data(tmp_path / "data")
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false"}

    one = subprocess.run([sys.executable, *train_args(tiny_model_dir, data, tmp_path / "one")],
                         capture_output=True, text=True, env=env, timeout=300)
    assert one.returncode == 0, one.stderr[-3000:]
    two = subprocess.run([str(launcher), "-n", "2", "--backend", "ring", "--", sys.executable,
                          *train_args(tiny_model_dir, data, tmp_path / "two")],
                         capture_output=True, text=True, env=env, timeout=300)
    assert two.returncode == 0, two.stdout[-3000:] + two.stderr[-3000:]
    assert "2 ranks" in two.stdout + two.stderr

    a = {k: np.array(v) for k, v in mx.load(str(tmp_path / "one" / "adapters.safetensors")).items()}
    b = {k: np.array(v) for k, v in mx.load(str(tmp_path / "two" / "adapters.safetensors")).items()}
    assert a.keys() == b.keys()
    moved = max(np.abs(v).max() for k, v in a.items() if k.endswith("lora_b"))  # lora_b starts at 0
    assert moved > 1e-3
    for k in a:
        np.testing.assert_allclose(b[k], a[k], rtol=1e-4, atol=1e-6, err_msg=k)

    # Only rank 0 writes: each record once, and the same numbers as one process.
    m1 = [json.loads(x) for x in (tmp_path / "one" / "metrics.jsonl").read_text().splitlines()]
    m2 = [json.loads(x) for x in (tmp_path / "two" / "metrics.jsonl").read_text().splitlines()]
    assert [(r["type"], r["step"]) for r in m2] == [(r["type"], r["step"]) for r in m1]
    assert [(r["type"], r["step"]) for r in m1] == [("val", 0), ("train", 1), ("train", 2), ("val", 2)]
    for r1, r2 in zip(m1, m2):
        assert r2["loss"] == pytest.approx(r1["loss"], rel=1e-4)
        assert r2["acc"] == pytest.approx(r1["acc"], abs=1e-6)
        if r1["type"] == "train":
            assert r2["tokens"] == r1["tokens"] and r2["loss_tokens"] == r1["loss_tokens"]
    cfg = json.loads((tmp_path / "two" / "adapter_config.json").read_text())
    assert cfg["world_size"] == 2
    assert (two.stdout.count(str(tmp_path / "two")) == 1), two.stdout  # the folder is printed by rank 0 only
