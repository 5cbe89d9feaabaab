"""End to end on the embedded SmolLM2-135M student: a really trained adapter, exported with
PEFT and GGUF from a run folder, loaded by transformers and peft within the fp32 bounds."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from mlx_distill.export import cli
from tests.test_export_helpers import lora_b_norm, make_adapter

pytestmark = [pytest.mark.slow, pytest.mark.torch]


@pytest.fixture(scope="module")
def demo_run(demo_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    pytest.importorskip("torch")
    pytest.importorskip("peft")
    pytest.importorskip("gguf")
    run = tmp_path_factory.mktemp("demo_run")
    # 3 Adam steps at lr 1e-3 on the last 2 layers (~15 s): loss 4.3 -> 2.8, and LoRA B ~1e-2,
    # which moves logits by whole units, so an export that lost the adapter cannot pass.
    make_adapter(demo_model_dir, run / "adapters", num_layers=2, rank=4, scale=10.0, iters=3,
                 learning_rate=1e-3, extra_config={"model": "demo"})
    (run / "teacher_data.jsonl").write_text(json.dumps(
        {"id": "p1", "prompt": "q", "response": "a", "model": "claude-sonnet-4-6",
         "usage": {"input_tokens": 120, "output_tokens": 480}}) + "\n")
    (run / "metrics.jsonl").write_text(
        json.dumps({"type": "train", "step": 1, "epoch": 0.5, "loss": 4.3, "acc": 0.31}) + "\n"
        + json.dumps({"type": "train", "step": 3, "epoch": 1.5, "loss": 2.8, "acc": 0.45}) + "\n")
    res = CliRunner().invoke(cli, ["--model", "demo", "--adapter-path", str(run / "adapters"),
                                   "--peft", "--gguf", "--push-to-hub", "me/smol-student", "--dry-run"])
    assert res.exit_code == 0, res.output
    return run


def test_demo_export_verified(demo_run: Path) -> None:
    out = demo_run / "export"  # the run folder's export/ is the default --out
    assert lora_b_norm(demo_run / "adapters") > 1e-3
    v = json.loads((out / "verify.json").read_text())
    assert v["adapter_effect"]["max_abs_logit_diff"] > 1.0
    for key in ("mlx_fused_vs_adapter", "transformers_vs_mlx", "peft_vs_mlx_adapter"):
        assert v[key]["max_abs_logit_diff"] <= 1e-3 and v[key]["argmax_agreement"] == 1.0, (key, v[key])
    assert v["transformers_vs_mlx"]["greedy_identical"] and max(v["transformers_vs_mlx"]["greedy_tokens"]) == 32
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["torch_dtype"] == "float32" and cfg["num_hidden_layers"] == 30
    pcfg = json.loads((out / "peft" / "adapter_config.json").read_text())
    assert pcfg["base_model_name_or_path"] == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert pcfg["layers_to_transform"] == [28, 29] and pcfg["lora_alpha"] == 40
    card = (out / "README.md").read_text()
    assert "base_model: HuggingFaceTB/SmolLM2-135M-Instruct" in card and "license: apache-2.0" in card
    assert "claude-sonnet-4-6" in card and "Anthropic's terms" in card
    assert "| train loss | 4.3 | 2.8 |" in card and "dequantized GGUF" in card


def test_demo_gguf_matches_llama_cpp_layout(demo_run: Path) -> None:
    """Our GGUF's tokenizer metadata equals the one llama.cpp wrote for SmolLM2, and a layer the
    adapter did not touch equals the original GGUF's (dequantized) tensor: same Q/K permutation."""
    import mlx.core as mx
    import numpy as np
    from gguf import GGUFReader

    from mlx_distill.models import demo_gguf_path

    ours = GGUFReader(str(demo_run / "export" / "smol-student-f16.gguf"))
    orig_path = demo_gguf_path()
    orig = GGUFReader(str(orig_path))
    for key in ("tokenizer.ggml.model", "tokenizer.ggml.pre", "tokenizer.ggml.tokens", "tokenizer.ggml.merges",
                "tokenizer.ggml.token_type", "tokenizer.ggml.bos_token_id", "tokenizer.ggml.eos_token_id",
                "tokenizer.ggml.padding_token_id", "tokenizer.ggml.unknown_token_id",
                "tokenizer.ggml.add_bos_token", "tokenizer.chat_template", "llama.rope.freq_base",
                "llama.attention.head_count_kv", "llama.rope.dimension_count", "general.license"):
        assert ours.fields[key].contents() == orig.fields[key].contents(), key
    q = {t.name: t for t in ours.tensors}["blk.0.attn_q.weight"]
    w = mx.load(str(orig_path))
    ref = mx.dequantize(w["blk.0.attn_q.weight"], w["blk.0.attn_q.scales"].astype(mx.float32),
                        w["blk.0.attn_q.biases"].astype(mx.float32), group_size=32, bits=4)
    got = np.asarray(q.data, dtype=np.float32).reshape(576, 576)
    assert np.abs(got - np.array(ref)).max() < 2e-3  # F16 rounding only
