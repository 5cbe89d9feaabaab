"""GGUF import: naming, Q/K un-permutation, quantization formats, the embedded model."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest

from mlx_distill.errors import ConfigError
from mlx_distill.gguf_import import import_gguf, unpermute_rows
from tests.helpers import TINY_ARGS

gguf = pytest.importorskip("gguf")


def llama_cpp_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's convert_hf_to_gguf permutation (HF -> GGUF rows)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def test_unpermute_inverts_llama_cpp_permute() -> None:
    rng = np.random.default_rng(0)
    for n_head, rows in ((4, 64), (2, 32), (9, 576)):
        w = rng.standard_normal((rows, 8)).astype(np.float32)
        back = unpermute_rows(mx.array(llama_cpp_permute(w, n_head)), n_head)
        np.testing.assert_array_equal(np.array(back), w)


def _tiny_hf_weights(seed: int = 0) -> tuple[dict, dict]:
    from mlx.utils import tree_flatten
    from mlx_lm.models import llama

    mx.random.seed(seed)
    cfg = dict(TINY_ARGS)
    model = llama.Model(llama.ModelArgs.from_dict(cfg))
    mx.eval(model.parameters())
    return {k: np.array(v) for k, v in tree_flatten(model.parameters())}, cfg


def write_tiny_gguf(path: Path, demo_dir: Path, qtype: str) -> dict:
    """Write the tiny llama as a llama.cpp-style GGUF (permuted Q/K) with the demo tokenizer."""
    weights, cfg = _tiny_hf_weights()
    from mlx_distill.models import demo_gguf_path  # the tokenizer comes from the real GGUF

    reader = gguf.GGUFReader(str(demo_gguf_path()))

    def field(name: str):  # noqa: ANN202
        f = reader.fields[name]
        return f.contents()

    w = gguf.GGUFWriter(str(path), "llama")
    w.add_block_count(cfg["num_hidden_layers"])
    w.add_context_length(cfg["max_position_embeddings"])
    w.add_embedding_length(cfg["hidden_size"])
    w.add_feed_forward_length(cfg["intermediate_size"])
    w.add_head_count(cfg["num_attention_heads"])
    w.add_head_count_kv(cfg["num_key_value_heads"])
    w.add_rope_dimension_count(cfg["head_dim"])
    w.add_rope_freq_base(cfg["rope_theta"])
    w.add_layer_norm_rms_eps(cfg["rms_norm_eps"])
    w.add_vocab_size(cfg["vocab_size"])
    ftype = {"F32": 0, "F16": 1, "Q4_0": 2, "Q8_0": 7}[qtype]
    w.add_file_type(ftype)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("smollm")
    w.add_token_list(field("tokenizer.ggml.tokens"))
    w.add_token_merges(field("tokenizer.ggml.merges"))
    w.add_token_types(field("tokenizer.ggml.token_type"))
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_pad_token_id(2)
    w.add_chat_template(field("tokenizer.chat_template"))
    names = {v: k for k, v in {
        "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
        "attn_output": "self_attn.o_proj", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
        "ffn_down": "mlp.down_proj", "attn_norm": "input_layernorm",
        "ffn_norm": "post_attention_layernorm"}.items()}
    for key, value in weights.items():
        if key == "model.embed_tokens.weight":
            gname = "token_embd.weight"
        elif key == "model.norm.weight":
            gname = "output_norm.weight"
        else:
            _, _, layer, *rest = key.split(".")
            local = ".".join(rest[:-1])
            if local.endswith("q_proj"):
                value = llama_cpp_permute(value, cfg["num_attention_heads"])
            elif local.endswith("k_proj"):
                value = llama_cpp_permute(value, cfg["num_key_value_heads"])
            gname = f"blk.{layer}.{names[local]}.weight"
        if value.ndim == 1 or qtype == "F32":
            w.add_tensor(gname, value.astype(np.float32))
        elif qtype == "F16":
            w.add_tensor(gname, value.astype(np.float16))
        else:
            qt = getattr(gguf.GGMLQuantizationType, qtype)
            w.add_tensor(gname, gguf.quants.quantize(value.astype(np.float32), qt), raw_dtype=qt)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return weights


def _logits(model_dir: Path, tokens: list[int]) -> np.ndarray:
    from mlx_lm.utils import load_model

    model, _ = load_model(model_dir)
    model.set_dtype(mx.float32)
    return np.array(model(mx.array([tokens])).astype(mx.float32))


@pytest.mark.parametrize(
    ("qtype", "tol"), [("F32", 1e-4), ("F16", 5e-2), ("Q8_0", 0.1), ("Q4_0", 1.5)]
)
def test_gguf_formats_import_to_reference_logits(
    qtype: str, tol: float, tmp_path: Path, demo_model_dir: Path, tiny_model_dir: Path
) -> None:
    """A llama.cpp-layout GGUF imports back to the HF-layout model it came from."""
    src = tmp_path / f"tiny-{qtype}.gguf"
    weights = write_tiny_gguf(src, demo_model_dir, qtype)
    ref_dir = tmp_path / "ref"
    ref_dir.mkdir()
    mx.save_safetensors(str(ref_dir / "model.safetensors"), {k: mx.array(v) for k, v in weights.items()})
    (ref_dir / "config.json").write_text(json.dumps(TINY_ARGS))
    tokens = [1, 504, 3458, 314, 253, 1789, 30, 2, 17, 9]
    ref = _logits(ref_dir, tokens)
    for variant in ("float32", "quantized"):
        out = import_gguf(src, tmp_path / f"imp-{qtype}-{variant}", variant=variant)
        got = _logits(out, tokens)
        err = float(np.abs(got - ref).max())
        assert err < tol, f"{qtype}/{variant}: max |dlogit| {err}"
        cfg = json.loads((out / "config.json").read_text())
        assert cfg["tie_word_embeddings"] is True and cfg["rope_traditional"] is False
        if variant == "quantized" and qtype.startswith("Q"):
            assert cfg["quantization"]["bits"] in (4, 8)
        else:
            assert "quantization" not in cfg and cfg["torch_dtype"] == "float32"


def test_demo_model_configs(demo_model_dir: Path) -> None:
    from mlx_distill.models import demo_model_dir as build

    cfg = json.loads((demo_model_dir / "config.json").read_text())
    assert (cfg["num_hidden_layers"], cfg["hidden_size"], cfg["num_attention_heads"]) == (30, 576, 9)
    assert (cfg["num_key_value_heads"], cfg["head_dim"], cfg["vocab_size"]) == (3, 64, 49152)
    assert cfg["tie_word_embeddings"] and not cfg["rope_traditional"] and cfg["torch_dtype"] == "float32"
    q = build("quantized")
    qcfg = json.loads((q / "config.json").read_text())["quantization"]
    # Mixed precision as in the GGUF: 4-bit everywhere, 8-bit embedding (per-module override).
    assert qcfg["bits"] == 4 and qcfg["group_size"] == 32
    assert qcfg["model.embed_tokens"]["bits"] == 8
    tok = json.loads((demo_model_dir / "tokenizer_config.json").read_text())
    assert "{% for message in messages %}" in tok["chat_template"]
    assert isinstance(tok["additional_special_tokens"], list) and "extra_special_tokens" not in tok
    assert (demo_model_dir / "tokenizer.json").is_file() and (demo_model_dir / "model.safetensors").is_file()


def test_demo_quantized_matches_fp32_logits(demo_model_dir: Path) -> None:
    from mlx_distill.models import demo_model_dir as build

    tokens = [1, 9690, 198, 2683, 253, 13567, 2]
    fp32 = _logits(demo_model_dir, tokens)
    q = _logits(build("quantized"), tokens)
    # Same weights, dequantized in fp32 vs on the fly in fp16: tiny differences only.
    assert float(np.abs(fp32 - q).max()) < 0.05
    assert (fp32.argmax(-1) == q.argmax(-1)).all()


def test_unsupported_architecture_is_clear(tmp_path: Path) -> None:
    path = tmp_path / "x.gguf"
    w = gguf.GGUFWriter(str(path), "gpt2")
    w.add_tensor("token_embd.weight", np.zeros((4, 4), np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(ConfigError, match="architecture 'gpt2' is not supported"):
        import_gguf(path, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_not_a_gguf_file(tmp_path: Path) -> None:
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"not a gguf")
    with pytest.raises(ConfigError, match="not a readable GGUF"):
        import_gguf(bad, tmp_path / "out")


@pytest.mark.slow
def test_demo_tokenizer_matches_transformers_gguf_loader(demo_model_dir: Path) -> None:
    """Our tokenizer.json encodes like transformers' own GGUF tokenizer conversion."""
    transformers = pytest.importorskip("transformers")
    from mlx_distill.models import demo_gguf_path

    gguf_file = demo_gguf_path()
    theirs = transformers.AutoTokenizer.from_pretrained(str(gguf_file.parent), gguf_file=gguf_file.name)
    ours = transformers.AutoTokenizer.from_pretrained(str(demo_model_dir))
    source = Path(__file__).read_text()
    texts = [
        "Write a Python function that reverses a string.",
        "def f(x: int) -> int:\n    return x * 12345 + 0.5  # numbers 2024-11-27\n",
        "  leading spaces\tand tabs\n\n\nnewlines",
        "Unicode: naïve café 東京 🚀 — “quotes”",
        "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n",
        "SELECT AVG(salary) OVER (PARTITION BY dept) FROM employees;",
        source,
    ]
    for text in texts:
        assert ours.encode(text, add_special_tokens=False) == theirs.encode(text, add_special_tokens=False), text[:40]


@pytest.mark.slow
def test_demo_model_reverses_a_string(demo_model_dir: Path, tmp_path: Path) -> None:
    """The fp32 demo model's greedy answer is code that really reverses a string."""
    from mlx_distill import models
    from mlx_distill.generate import generate_batch

    model, tokenizer, _ = models.load("demo")
    [answer] = generate_batch(
        model, tokenizer, ["Write a Python function that reverses a string."], max_tokens=160
    )
    import re

    blocks = re.findall(r"```(?:python)?\n(.*?)```", answer.text, re.S)
    assert blocks, answer.text
    code = blocks[0]
    name = re.search(r"def (\w+)\(", code).group(1)
    script = tmp_path / "check.py"
    script.write_text(code + f"\nassert {name}('hello') == 'olleh'\nassert {name}('') == ''\nprint('ok')\n")
    out = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=30)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr
