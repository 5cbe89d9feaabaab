"""``train --loss kd`` data-parallel under ``mlx.launch`` on loopback equals one process."""

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

from tests.helpers import write_tiny_llama


def uneven_data(root: Path) -> Path:
    """8 examples with answers of 1 to 22 words: the two ranks hold different answer-token counts."""
    root.mkdir(parents=True)
    rows = [{"messages": [{"role": "user", "content": f"question {i}"},
                          {"role": "assistant", "content": " ".join(["word"] * (1 + 3 * i))}]} for i in range(8)]
    (root / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (root / "valid.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows[:3]))
    return root


def args(model: Path, teacher: Path, data: Path, adapter: Path, top_k: int | None) -> list[str]:
    out = ["-m", "mlx_distill.train", "--model", str(model), "--data", str(data), "--adapter-path", str(adapter),
           "--iters", "2", "--batch-size", "4", "--learning-rate", "1e-3", "--lora-rank", "4", "--no-progress",
           "--loss", "kd", "--teacher-model", str(teacher), "--teacher-system", "Answer like a senior engineer.",
           "--kd-ratio", "0.7", "--kd-temperature", "2.0"]
    return out + (["--kd-top-k", str(top_k)] if top_k else [])


@pytest.mark.slow
@pytest.mark.parametrize("top_k", [None, 16])
def test_two_ranks_match_one_process(tmp_path: Path, tiny_model_dir: Path, top_k: int | None) -> None:
    launcher = Path(sys.executable).parent / "mlx.launch"
    if not launcher.exists():
        launcher = Path(shutil.which("mlx.launch") or "mlx.launch")
    teacher = write_tiny_llama(tmp_path / "teacher", tiny_model_dir, seed=3)
    # Separate data folders, so the 2-rank run builds its own top-K cache (rank 0 writes, rank 1 waits).
    d1, d2 = uneven_data(tmp_path / "d1"), uneven_data(tmp_path / "d2")
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false"}

    one = subprocess.run([sys.executable, *args(tiny_model_dir, teacher, d1, tmp_path / "one", top_k)],
                         capture_output=True, text=True, env=env, timeout=300)
    assert one.returncode == 0, one.stderr[-3000:]
    two = subprocess.run([str(launcher), "-n", "2", "--backend", "ring", "--", sys.executable,
                          *args(tiny_model_dir, teacher, d2, tmp_path / "two", top_k)],
                         capture_output=True, text=True, env=env, timeout=300)
    assert two.returncode == 0, two.stdout[-3000:] + two.stderr[-3000:]
    assert "2 ranks" in two.stdout + two.stderr

    a = {k: np.array(v) for k, v in mx.load(str(tmp_path / "one" / "adapters.safetensors")).items()}
    b = {k: np.array(v) for k, v in mx.load(str(tmp_path / "two" / "adapters.safetensors")).items()}
    assert a.keys() == b.keys()
    assert max(np.abs(v).max() for k, v in a.items() if k.endswith("lora_b")) > 1e-3
    for k in a:
        np.testing.assert_allclose(b[k], a[k], rtol=1e-4, atol=1e-6, err_msg=k)

    m1 = [json.loads(x) for x in (tmp_path / "one" / "metrics.jsonl").read_text().splitlines()]
    m2 = [json.loads(x) for x in (tmp_path / "two" / "metrics.jsonl").read_text().splitlines()]
    assert [(r["type"], r["step"]) for r in m2] == [(r["type"], r["step"]) for r in m1]
    for r1, r2 in zip(m1, m2):
        for key in ("loss", "ce", "kl"):
            assert r2[key] == pytest.approx(r1[key], rel=1e-4), (key, r1, r2)
        assert r1["kl"] > 0
    if top_k:
        for d in (d1, d2):  # one cache per split, built once, identical either way
            assert sorted(p.name.split("-")[0] for p in (d / "kd-cache").iterdir()) == ["train", "valid"]
        c1 = {p.name: p.read_bytes() for p in (d1 / "kd-cache").iterdir()}
        c2 = {p.name: p.read_bytes() for p in (d2 / "kd-cache").iterdir()}
        assert c1.keys() == c2.keys()  # same key: the cache depends on the teacher rows, not the folder
        for name in c1:
            x, y = mx.load(str(d1 / "kd-cache" / name)), mx.load(str(d2 / "kd-cache" / name))
            for k in x:
                np.testing.assert_array_equal(np.array(x[k]), np.array(y[k]), err_msg=f"{name}:{k}")
    cfg = json.loads((tmp_path / "two" / "adapter_config.json").read_text())
    assert cfg["world_size"] == 2 and cfg["kd"]["top_k"] == top_k
