"""KD on the embedded SmolLM2 with the offline demo teacher (its style prompt): works offline."""

from __future__ import annotations

import json
from pathlib import Path

import mlx.core as mx  # conftest imported mlx_distill first (OpenBLAS)
import pytest

from mlx_distill.teachers import style_prompt
from mlx_distill.train import TrainConfig, train
from tests.test_kd_train import Loader, first_batch, kd_parts

ANSWERS = [
    ("Reverse a string in Python.", "```python\ndef reverse(s: str) -> str:\n    return s[::-1]\n```"),
    ("Add two numbers in Python.", "```python\ndef add(a: int, b: int) -> int:\n    return a + b\n```"),
    ("Square a number in Python.", "```python\ndef square(x: float) -> float:\n    return x * x\n```"),
    ("Check if a number is even.", "```python\ndef is_even(n: int) -> bool:\n    return n % 2 == 0\n```"),
]


@pytest.mark.slow
def test_demo_teacher_context_distillation(tmp_path: Path, demo_model_dir: Path) -> None:
    data = tmp_path / "data"
    data.mkdir()
    rows = [{"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]} for q, a in ANSWERS]
    (data / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    loader = Loader()
    common = dict(model=str(demo_model_dir), data=str(data), batch_size=2, lora_rank=4, num_layers=4,
                  learning_rate=1e-4, loss="kd", teacher_model="demo", max_seq_length=128)

    def demo_loader(spec: str, *a: object) -> object:  # `demo` is the same folder the fixture built
        return loader(str(demo_model_dir) if spec == "demo" else spec, *a)

    # Same model, same context: the KL at the start is 0 (the LoRA B matrices start at 0).
    cfg = TrainConfig(**common, adapter_path=str(tmp_path / "unused"), teacher_system="")
    kd, student, train_set = kd_parts(cfg, demo_loader)
    _, _, m = kd.loss(student, *first_batch(kd, train_set))
    assert abs(float(m["kl"])) < 1e-4

    # The demo teacher sees its ~230-token style prompt; the student the plain prompt.
    logs: list[str] = []
    cfg = TrainConfig(**common, adapter_path=str(tmp_path / "ad"), iters=2, kd_top_k=16)
    result = train(cfg, model_loader=demo_loader, progress=False, echo=logs.append)
    line = next(s for s in logs if s.startswith("kd: teacher demo"))
    shift = int(line.split("own system prompt (")[1].split(" tokens")[0])
    assert shift > 150  # the style prompt replaces SmolLM2's one-line default system prompt
    assert any("teacher cache" in s and "written" in s for s in logs)
    recs = [json.loads(x) for x in result.metrics_path.read_text().splitlines()]
    assert [r["step"] for r in recs] == [1, 2]
    for r in recs:
        assert r["kl"] > 0.05 and r["ce"] > 0
        assert r["loss"] == pytest.approx(0.5 * r["ce"] + 0.5 * r["kl"], rel=1e-4)
    conf = json.loads((tmp_path / "ad" / "adapter_config.json").read_text())
    assert conf["kd"]["teacher"] == "demo" and conf["kd"]["top_k"] == 16
    assert conf["kd"]["teacher_system_sha256"] == __import__("hashlib").sha256(
        style_prompt().encode()).hexdigest()[:16]
    assert mx.load(str(tmp_path / "ad" / "adapters.safetensors"))
