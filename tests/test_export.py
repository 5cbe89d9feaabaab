"""`mlx-distill export` on the tiny 2-layer llama (real tokenizer): layout, parity, PEFT, GGUF, dtypes.

The parity checks here are independent of ``mlx_distill.verify``: they reload the
export with transformers / peft / the gguf reader and compare against an
adapter-applied MLX model built with mlx-lm's own loader.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest

from mlx_distill.export import ExportConfig, export_model
from tests.test_export_helpers import lora_b_norm, make_adapter

pytestmark = pytest.mark.torch
CHAT = [{"role": "user", "content": "Write a Python function that reverses a string."},
        {"role": "assistant", "content": "def reverse(s):\n    return s[::-1]"}]


@pytest.fixture(scope="module")
def tiny_adapter(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    # lr 1e-2 on the random tiny model: 4 steps move LoRA B to ~0.1, so the adapter
    # changes logits by whole units (a fuse that dropped it could not pass).
    return make_adapter(tiny_model_dir, tmp_path_factory.mktemp("tiny_adapter") / "adapters",
                        iters=4, learning_rate=1e-2)


@pytest.fixture(scope="module")
def tiny_export(tiny_model_dir: Path, tiny_adapter: Path, tmp_path_factory: pytest.TempPathFactory):
    pytest.importorskip("torch")
    pytest.importorskip("peft")
    pytest.importorskip("gguf")
    out = tmp_path_factory.mktemp("tiny_export") / "student"
    cfg = ExportConfig(model=str(tiny_model_dir), adapter_path=str(tiny_adapter), out=str(out),
                       peft=True, gguf=True)
    return export_model(cfg, echo=lambda s: None)


def mlx_adapted_logits(model_dir: Path, adapter: Path | None, ids: list[int]):
    import mlx.core as mx
    import numpy as np
    from mlx_lm.utils import load

    model, _ = load(str(model_dir), adapter_path=str(adapter) if adapter else None)
    model.set_dtype(mx.float32)
    return np.array(model(mx.array([ids]))[0])


def chat_ids(folder: Path) -> list[int]:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(folder))
    return list(tok.apply_chat_template(CHAT, tokenize=True, return_dict=False))


def safetensors_dtypes(path: Path) -> set[str]:
    raw = path.read_bytes()
    n = struct.unpack("<Q", raw[:8])[0]
    header = json.loads(raw[8:8 + n])
    return {v["dtype"] for k, v in header.items() if k != "__metadata__"}


def test_adapter_is_really_trained(tiny_adapter: Path) -> None:
    assert lora_b_norm(tiny_adapter) > 0.01  # B starts at zero; this is what training moved


def test_fused_folder_layout(tiny_export, tiny_model_dir: Path) -> None:
    import yaml

    out = tiny_export.out
    for name in ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
                 "generation_config.json", "README.md", "verify.json", "export_config.json",
                 "peft/adapter_model.safetensors", "peft/adapter_config.json", "student-f16.gguf"):
        assert (out / name).is_file(), name
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["torch_dtype"] == cfg["dtype"] == "float32"
    assert safetensors_dtypes(out / "model.safetensors") == {"F32"}
    assert "quantization" not in cfg and "quantization_config" not in cfg
    tcfg = json.loads((out / "tokenizer_config.json").read_text())
    # transformers 4.57 crashes on a list-valued extra_special_tokens; 4.x ignores chat_template.jinja.
    assert not isinstance(tcfg.get("extra_special_tokens"), list)
    assert isinstance(tcfg["additional_special_tokens"], list) and "<|im_end|>" in tcfg["additional_special_tokens"]
    assert isinstance(tcfg["chat_template"], str) and "<|im_start|>" in tcfg["chat_template"]
    gen = json.loads((out / "generation_config.json").read_text())
    assert gen["eos_token_id"] == 2 and gen["pad_token_id"] == 2
    front = (out / "README.md").read_text().split("---")[1]
    meta = yaml.safe_load(front)
    assert meta["library_name"] == "transformers" and meta["pipeline_tag"] == "text-generation"
    assert "mlx" in meta["tags"] and meta["license"]
    assert not list(out.parent.glob(".student.staging-*")), "staging folder left behind"


def test_verify_report_within_bounds(tiny_export) -> None:
    v = json.loads((tiny_export.out / "verify.json").read_text())
    assert v["passed"] is True
    assert v["adapter_effect"]["max_abs_logit_diff"] > 0.5  # the adapter visibly changes logits
    for key in ("mlx_fused_vs_adapter", "transformers_vs_mlx", "peft_vs_mlx_adapter"):
        assert v[key]["max_abs_logit_diff"] <= 1e-3, key
        assert v[key]["argmax_agreement"] == 1.0, key
    assert v["transformers_vs_mlx"]["greedy_identical"] is True
    assert v["gguf"][0]["passed"] is True


def test_transformers_reproduces_adapter(tiny_export, tiny_model_dir: Path, tiny_adapter: Path) -> None:
    import numpy as np
    import torch
    from transformers import AutoModelForCausalLM

    ids = chat_ids(tiny_export.out)
    ref = mlx_adapted_logits(tiny_model_dir, tiny_adapter, ids)
    base = mlx_adapted_logits(tiny_model_dir, None, ids)
    model = AutoModelForCausalLM.from_pretrained(str(tiny_export.out), dtype=torch.float32).eval()
    assert model.dtype == torch.float32
    with torch.no_grad():
        hf = model(torch.tensor([ids])).logits[0].numpy()
    assert np.abs(hf - ref).max() <= 1e-3
    assert (hf.argmax(-1) == ref.argmax(-1)).all()
    assert np.abs(base - ref).max() > 0.5  # and the adapter is what made the difference


@pytest.mark.filterwarnings("ignore::FutureWarning")  # peft 0.21 on transformers 5.x
def test_peft_adapter_reproduces_mlx(tiny_export, tiny_model_dir: Path, tiny_adapter: Path) -> None:
    import mlx.core as mx
    import numpy as np
    import torch
    from peft import PeftModel
    from safetensors.numpy import load_file
    from transformers import AutoModelForCausalLM

    pdir = tiny_export.out / "peft"
    pcfg = json.loads((pdir / "adapter_config.json").read_text())
    acfg = json.loads((tiny_adapter / "adapter_config.json").read_text())
    lp = acfg["lora_parameters"]
    assert pcfg["r"] == lp["rank"] and pcfg["lora_alpha"] == lp["scale"] * lp["rank"]
    assert pcfg["peft_type"] == "LORA" and pcfg["task_type"] == "CAUSAL_LM"
    assert pcfg["bias"] == "none" and pcfg["fan_in_fan_out"] is False and pcfg["lora_dropout"] == 0.0
    assert set(pcfg["target_modules"]) == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
    assert pcfg["layers_to_transform"] == [0, 1]
    assert pcfg["base_model_name_or_path"]
    # MLX lora_a (in, r) / lora_b (r, out) -> PEFT lora_A (r, in) / lora_B (out, r)
    mlx_w = mx.load(str(tiny_adapter / "adapters.safetensors"))
    peft_w = load_file(str(pdir / "adapter_model.safetensors"))
    name = "model.layers.1.self_attn.q_proj"
    a, b = np.array(mlx_w[f"{name}.lora_a"]), np.array(mlx_w[f"{name}.lora_b"])
    assert a.shape == (64, 4) and b.shape == (4, 64)
    assert np.array_equal(peft_w[f"base_model.model.{name}.lora_A.weight"], a.T)
    assert np.array_equal(peft_w[f"base_model.model.{name}.lora_B.weight"], b.T)

    ids = chat_ids(tiny_export.out)
    ref = mlx_adapted_logits(tiny_model_dir, tiny_adapter, ids)
    base = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir), dtype=torch.float32)
    model = PeftModel.from_pretrained(base, str(pdir)).eval()
    with torch.no_grad():
        got = model(torch.tensor([ids])).logits[0].numpy()
    assert np.abs(got - ref).max() <= 1e-3
    assert (got.argmax(-1) == ref.argmax(-1)).all()


def test_gguf_reads_back_and_round_trips(tiny_export, tmp_path: Path) -> None:
    import mlx.core as mx
    import numpy as np
    from gguf import GGUFReader
    from mlx_lm.utils import load

    from mlx_distill.gguf_import import import_gguf, unpermute_rows

    path = tiny_export.out / "student-f16.gguf"
    r = GGUFReader(str(path))
    f = {k: v.contents() for k, v in r.fields.items() if not k.startswith("GGUF.")}
    assert f["general.architecture"] == "llama" and f["llama.block_count"] == 2
    assert f["llama.attention.head_count"] == 4 and f["llama.attention.head_count_kv"] == 2
    assert f["tokenizer.ggml.model"] == "gpt2" and f["tokenizer.ggml.pre"] == "smollm"
    assert len(f["tokenizer.ggml.tokens"]) == 49152 and f["tokenizer.ggml.tokens"][2] == "<|im_end|>"
    assert f["tokenizer.ggml.eos_token_id"] == 2 and "<|im_start|>" in f["tokenizer.chat_template"]
    tensors = {t.name: t for t in r.tensors}
    assert len(tensors) == 2 * 9 + 2  # 9 per block + token_embd + output_norm (tied: no output)
    q = tensors["blk.1.attn_q.weight"]
    assert q.tensor_type.name == "F16" and tuple(reversed(q.shape.tolist())) == (64, 64)
    # llama.cpp's Q permutation, undone, gives back the fused HF weight
    fused = mx.load(str(tiny_export.out / "model.safetensors"))["model.layers.1.self_attn.q_proj.weight"]
    back = unpermute_rows(np.asarray(q.data, dtype=np.float32).reshape(64, 64), 4)
    assert np.abs(back - np.array(fused)).max() < 2e-3
    # And our own GGUF importer loads it back into a model computing the same function (fp16 weights).
    dest = import_gguf(path, tmp_path / "from_gguf", variant="float32")
    ids = chat_ids(tiny_export.out)
    a, _ = load(str(dest))
    b, _ = load(str(tiny_export.out))
    la, lb = np.array(a(mx.array([ids]))[0]), np.array(b(mx.array([ids]))[0])
    assert np.abs(la - lb).max() < 0.05
    assert (la.argmax(-1) == lb.argmax(-1)).mean() >= 0.95


@pytest.mark.parametrize("dtype,st", [("float16", "F16"), ("bfloat16", "BF16")])
def test_half_precision_export(dtype: str, st: str, tiny_model_dir: Path, tiny_adapter: Path, tmp_path: Path) -> None:
    pytest.importorskip("torch")
    import torch
    from transformers import AutoModelForCausalLM

    out = tmp_path / dtype
    res = export_model(ExportConfig(model=str(tiny_model_dir), adapter_path=str(tiny_adapter), out=str(out),
                                    dtype=dtype), echo=lambda s: None)
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["torch_dtype"] == cfg["dtype"] == dtype
    assert safetensors_dtypes(out / "model.safetensors") == {st}
    v = res.verify
    assert v["mlx_fused_vs_adapter"]["max_abs_logit_diff"] <= 1e-3  # fp32, before the cast
    assert v["cast"]["passed"] and v["cast"]["argmax_agreement"] >= 0.95
    assert v["cast"]["mean_abs_logit_diff"] <= 0.1 * v["adapter_effect"]["mean_abs_logit_diff"]
    assert v["transformers_vs_mlx"]["max_abs_logit_diff"] <= 1e-3  # same stored weights, fp32 compute
    model = AutoModelForCausalLM.from_pretrained(str(out), dtype="auto")
    assert model.dtype == getattr(torch, dtype)  # config.json states what is stored
    assert f"stored as {dtype}" in (out / "README.md").read_text()


@pytest.mark.parametrize("kind", ["dora", "full"])
def test_dora_and_full_fine_tunes_fuse_and_verify(kind: str, tiny_model_dir: Path, tmp_path: Path) -> None:
    pytest.importorskip("torch")
    ad = make_adapter(tiny_model_dir, tmp_path / "ad", iters=3, learning_rate=1e-2, fine_tune_type=kind)
    res = export_model(ExportConfig(model=str(tiny_model_dir), adapter_path=str(ad), out=str(tmp_path / "out")),
                       echo=lambda s: None)
    v = res.verify
    assert v["mlx_fused_vs_adapter"]["max_abs_logit_diff"] <= 1e-3
    assert v["transformers_vs_mlx"]["argmax_agreement"] == 1.0 and v["transformers_vs_mlx"]["greedy_identical"]
    if kind == "dora":  # the adapter wrappers can be swapped out, so its effect is measured
        assert v["adapter_effect"]["max_abs_logit_diff"] > 0.1
    assert f"fine_tune_type | {kind}" in (tmp_path / "out" / "README.md").read_text()
