"""GGUF of a fused llama-family export, written with the ``gguf`` package and read back.

Why not mlx-lm's ``convert_to_gguf``: it labels every vocabulary
``tokenizer.ggml.model = "llama"`` (SentencePiece) with no merges, which is
wrong for byte-level BPE students such as SmolLM2 (llama.cpp would mis-tokenize),
and it derives ``rope.dimension_count`` as hidden/heads. Here the tokenizer is
written the way llama.cpp's own converter does (``gpt2`` model, merges, token
types, pre-tokenizer name, chat template), and the Q/K rows get llama.cpp's
RoPE permutation (the inverse of ``gguf_import.unpermute_rows``).

Tensors are F16 (1-D norms F32), llama.cpp's ``--outtype f16`` layout, the usual
input to ``llama-quantize``. Other architectures and SentencePiece vocabularies
are refused with a pointer to llama.cpp's ``convert_hf_to_gguf.py``, which works
on the exported Hugging Face folder.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from mlx_distill.errors import ConfigError, VerificationError
from mlx_distill.gguf_import import _LLAMA3_SPLIT, LAYER_NAMES, TOP_NAMES

CONVERTER_HINT = (
    "convert the exported Hugging Face folder with llama.cpp instead: "
    "python convert_hf_to_gguf.py {folder} --outtype f16"
)
_TO_GGUF_LAYER = {v: k for k, v in LAYER_NAMES.items()}
_TO_GGUF_TOP = {v: k for k, v in TOP_NAMES.items()}
TOKEN_NORMAL, TOKEN_CONTROL, TOKEN_USER_DEFINED, TOKEN_UNUSED = 1, 3, 4, 5
FILE_TYPE_F16 = 1


def require_gguf() -> Any:
    try:
        import gguf
    except ImportError:
        raise ConfigError(
            "--gguf needs the `gguf` package: pip install 'mlx-distill[export]' (or pip install gguf)"
        ) from None
    return gguf


def _pre_name(pre: dict[str, Any] | None) -> str | None:
    """llama.cpp's pre-tokenizer name for a tokenizers pre_tokenizer, or None when unknown."""
    if not pre:
        return None
    steps = pre.get("pretokenizers", [pre]) if pre.get("type") == "Sequence" else [pre]
    kinds = [s.get("type") for s in steps]
    if kinds == ["Digits", "ByteLevel"] and steps[0].get("individual_digits"):
        return "smollm"
    if kinds == ["Split", "ByteLevel"] and (steps[0].get("pattern") or {}).get("Regex") == _LLAMA3_SPLIT:
        return "llama-bpe"
    if kinds == ["ByteLevel"] and steps[0].get("use_regex", True):
        return "gpt-2"
    return None


def check_supported(folder_or_base: Path, config: dict[str, Any]) -> None:
    """Refuse what this writer cannot express, before any work (names the fix)."""
    hint = CONVERTER_HINT.format(folder="OUT")
    if config.get("model_type") != "llama":
        raise ConfigError(
            f"--gguf: architecture {config.get('model_type')!r} is not supported here (llama family "
            f"only); {hint}"
        )
    if config.get("rope_scaling") or config.get("attention_bias") or config.get("mlp_bias"):
        raise ConfigError(f"--gguf: rope scaling or attention/MLP biases are not supported here; {hint}")
    tj = folder_or_base / "tokenizer.json"
    if not tj.is_file():
        raise ConfigError(f"--gguf: {tj} is missing (a byte-level BPE tokenizer.json is needed); {hint}")
    tok = json.loads(tj.read_text(encoding="utf-8"))
    decoder = (tok.get("decoder") or {}).get("type")
    if (tok.get("model") or {}).get("type") != "BPE" or decoder != "ByteLevel":
        raise ConfigError(
            f"--gguf: only byte-level BPE vocabularies are written here (this one is "
            f"{(tok.get('model') or {}).get('type')} with a {decoder} decoder, e.g. SentencePiece); {hint}"
        )


def tokenizer_metadata(folder: Path, vocab_size: int) -> dict[str, Any]:
    """llama.cpp tokenizer fields from a folder's tokenizer.json / tokenizer_config.json."""
    tok = json.loads((folder / "tokenizer.json").read_text(encoding="utf-8"))
    tcfg_path = folder / "tokenizer_config.json"
    tcfg = json.loads(tcfg_path.read_text(encoding="utf-8")) if tcfg_path.is_file() else {}
    vocab: dict[str, int] = tok["model"]["vocab"]
    added = tok.get("added_tokens") or []
    n = max([vocab_size, *(i + 1 for i in vocab.values()), *(a["id"] + 1 for a in added)])
    # Rows past the vocabulary (padded embeddings) get llama.cpp's [PADn] unused tokens.
    tokens = [f"[PAD{i}]" for i in range(n)]
    types = [TOKEN_UNUSED] * n
    for t, i in vocab.items():
        tokens[i], types[i] = t, TOKEN_NORMAL
    for a in added:
        tokens[a["id"]] = a["content"]
        types[a["id"]] = TOKEN_CONTROL if a.get("special") else TOKEN_USER_DEFINED
    merges = [m if isinstance(m, str) else " ".join(m) for m in tok["model"].get("merges", [])]
    index = {t: i for i, t in enumerate(tokens)}

    def tid(name: str) -> int | None:
        v = tcfg.get(f"{name}_token")
        v = v.get("content") if isinstance(v, dict) else v
        return index.get(v) if v else None

    meta: dict[str, Any] = {
        "tokenizer.ggml.model": "gpt2",
        "tokenizer.ggml.pre": _pre_name(tok.get("pre_tokenizer")) or "default",
        "tokenizer.ggml.tokens": tokens,
        "tokenizer.ggml.token_type": types,
        "tokenizer.ggml.merges": merges,
        "tokenizer.ggml.add_bos_token": bool(tcfg.get("add_bos_token", False)),
    }
    for key, name in (("bos", "bos"), ("eos", "eos"), ("unknown", "unk"), ("padding", "pad")):
        if (i := tid(name)) is not None:
            meta[f"tokenizer.ggml.{key}_token_id"] = i
    if isinstance(tcfg.get("chat_template"), str):
        meta["tokenizer.chat_template"] = tcfg["chat_template"]
    return meta


def permute_rows(w: Any, n_head: int) -> Any:
    """llama.cpp's RoPE ``permute`` of Q/K rows: HF (h, i, j) -> llama.cpp (h, j, i)."""
    rows = w.shape[0]
    return w.reshape(n_head, 2, rows // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def gguf_name(name: str) -> str:
    """HF tensor name -> GGUF name (``model.layers.3.self_attn.q_proj.weight`` -> ``blk.3.attn_q.weight``)."""
    base, _, leaf = name.rpartition(".")
    if base in _TO_GGUF_TOP:
        return f"{_TO_GGUF_TOP[base]}.{leaf}"
    parts = base.split(".")
    if parts[:2] == ["model", "layers"] and ".".join(parts[3:]) in _TO_GGUF_LAYER:
        return f"blk.{parts[2]}.{_TO_GGUF_LAYER['.'.join(parts[3:])]}.{leaf}"
    raise ConfigError(f"--gguf: tensor {name!r} has no llama GGUF name")


def gguf_array(name: str, w: Any, config: dict[str, Any]) -> Any:
    """numpy data for one tensor: permuted if Q/K, F16 for matrices, F32 for 1-D norms."""
    import numpy as np

    a = np.asarray(w, dtype=np.float32)
    if name.endswith("self_attn.q_proj.weight"):
        a = permute_rows(a, config["num_attention_heads"])
    elif name.endswith("self_attn.k_proj.weight"):
        a = permute_rows(a, config.get("num_key_value_heads", config["num_attention_heads"]))
    return np.ascontiguousarray(a.astype(np.float16) if a.ndim > 1 else a)


def write_gguf(path: Path, weights: dict[str, Any], config: dict[str, Any], folder: Path,
               name: str, license_id: str | None = None) -> Path:
    """Write ``weights`` (HF names, any float dtype) as an F16 llama GGUF with tokenizer metadata."""
    import numpy as np

    gguf = require_gguf()
    check_supported(folder, config)
    heads = int(config["num_attention_heads"])
    hidden = int(config["hidden_size"])
    head_dim = int(config.get("head_dim") or hidden // heads)
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_name(name)
    w.add_file_type(FILE_TYPE_F16)
    if license_id:
        w.add_string("general.license", license_id)
    w.add_context_length(int(config.get("max_position_embeddings", 2048)))
    w.add_embedding_length(hidden)
    w.add_block_count(int(config["num_hidden_layers"]))
    w.add_feed_forward_length(int(config["intermediate_size"]))
    w.add_head_count(heads)
    w.add_head_count_kv(int(config.get("num_key_value_heads", heads)))
    w.add_rope_freq_base(float(config.get("rope_theta", 10000.0)))
    w.add_layer_norm_rms_eps(float(config.get("rms_norm_eps", 1e-5)))
    w.add_rope_dimension_count(head_dim)
    w.add_vocab_size(int(config["vocab_size"]))
    if head_dim != hidden // heads:
        w.add_key_length(head_dim)
        w.add_value_length(head_dim)
    tok = tokenizer_metadata(folder, int(config["vocab_size"]))
    w.add_tokenizer_model(tok["tokenizer.ggml.model"])
    w.add_tokenizer_pre(tok["tokenizer.ggml.pre"])
    w.add_token_list(tok["tokenizer.ggml.tokens"])
    w.add_token_types(tok["tokenizer.ggml.token_type"])
    w.add_token_merges(tok["tokenizer.ggml.merges"])
    w.add_add_bos_token(tok["tokenizer.ggml.add_bos_token"])
    for key in ("bos", "eos", "unknown", "padding"):
        if (v := tok.get(f"tokenizer.ggml.{key}_token_id")) is not None:
            w.add_uint32(f"tokenizer.ggml.{key}_token_id", int(v))
    if "tokenizer.chat_template" in tok:
        w.add_chat_template(tok["tokenizer.chat_template"])
    for k in sorted(weights, key=_order):
        w.add_tensor(gguf_name(k), gguf_array(k, np.asarray(weights[k]), config))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def _order(name: str) -> tuple[int, str]:
    parts = name.split(".")
    return (int(parts[2]) if parts[:2] == ["model", "layers"] else -1, name)


def _field(reader: Any, key: str) -> Any:
    f = reader.fields.get(key)
    return f.contents() if f is not None else None


def _load_some(file: Path, names: list[str]) -> dict[str, Any]:
    """fp32 numpy copies of the named tensors of one safetensors file (bf16 included)."""
    import mlx.core as mx
    import numpy as np

    arrays = mx.load(str(file))
    return {k: np.array(arrays[k].astype(mx.float32)) for k in names if k in arrays}


def read_back(path: Path, folder: Path) -> dict[str, Any]:
    """Reopen ``path`` with ``gguf.GGUFReader`` and check it against the HF ``folder``.

    Checks the hyperparameters, every tensor's name, shape and type, the tokenizer
    (tokens, types, merges, special ids, chat template), and the data of a few
    tensors, Q/K permutation included. Raises VerificationError on any difference.
    """
    import numpy as np
    from safetensors import safe_open

    gguf = require_gguf()
    config = json.loads((folder / "config.json").read_text())
    reader = gguf.GGUFReader(str(path))
    problems: list[str] = []
    hp = {
        "general.architecture": "llama",
        "llama.block_count": config["num_hidden_layers"],
        "llama.embedding_length": config["hidden_size"],
        "llama.attention.head_count": config["num_attention_heads"],
        "llama.attention.head_count_kv": config.get("num_key_value_heads", config["num_attention_heads"]),
        "llama.vocab_size": config["vocab_size"],
    }
    problems += [f"{k} = {_field(reader, k)!r}, expected {v!r}" for k, v in hp.items() if _field(reader, k) != v]
    tok = tokenizer_metadata(folder, int(config["vocab_size"]))
    for k, v in tok.items():
        got = _field(reader, k)
        if k == "tokenizer.ggml.token_type" and got is not None:
            got = [int(x) for x in got]
        if got != v:
            problems.append(f"{k} differs from the folder's tokenizer")
    files = sorted(folder.glob("*.safetensors"))
    expected: dict[str, tuple[int, ...]] = {}
    for f in files:
        with safe_open(str(f), "np") as st:
            names = list(st.keys())
            expected.update({gguf_name(k): tuple(st.get_slice(k).get_shape()) for k in names})
    tensors = {t.name: t for t in reader.tensors}
    if set(tensors) != set(expected):
        problems.append(f"tensor names differ: missing {sorted(set(expected) - set(tensors))[:5]}, "
                        f"extra {sorted(set(tensors) - set(expected))[:5]}")
    for n, t in tensors.items():
        shape = tuple(int(x) for x in reversed(t.shape.tolist()))  # GGML lists dims innermost first
        want = "F16" if len(shape) > 1 else "F32"
        if n in expected and shape != expected[n]:
            problems.append(f"{n}: shape {shape}, expected {expected[n]}")
        if t.tensor_type.name != want:
            problems.append(f"{n}: type {t.tensor_type.name}, expected {want}")
    # Data of a few tensors: a wrong Q/K permutation or name mapping shows as O(1) relative
    # differences; dtype rounding (a bf16 folder vs F16 here) stays below ~1e-2 relative.
    last = config["num_hidden_layers"] - 1
    spot = [f"model.layers.{last}.self_attn.q_proj.weight", f"model.layers.{last}.self_attn.k_proj.weight",
            "model.norm.weight"]
    worst = 0.0
    for f in files:
        arrays = _load_some(f, spot)
        for k, a in arrays.items():
            if gguf_name(k) not in tensors:
                continue
            want_a = gguf_array(k, a, config).astype(np.float32)
            got_a = np.asarray(tensors[gguf_name(k)].data, dtype=np.float32).reshape(want_a.shape)
            worst = max(worst, float(np.abs(got_a - want_a).max() / max(np.abs(want_a).max(), 1e-12)))
    if worst > 1e-2:
        problems.append(f"tensor data differs from the folder's weights (max relative |Δ| {worst:.3g})")
    if problems:
        raise VerificationError(f"{path}: GGUF read-back failed:\n  " + "\n  ".join(problems))
    return {
        "file": path.name,
        "tensors": len(tensors),
        "tokens": len(tok["tokenizer.ggml.tokens"]),
        "merges": len(tok["tokenizer.ggml.merges"]),
        "pre_tokenizer": tok["tokenizer.ggml.pre"],
        "chat_template": "tokenizer.chat_template" in tok,
        "max_relative_data_diff": worst,
        "checked": "hyperparameters, tensor names/shapes/types, tokenizer, Q/K/norm data",
        "passed": True,
    }
