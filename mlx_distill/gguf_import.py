"""Import a llama-family GGUF file into a standard mlx-lm model directory.

``mx.load`` reads GGUF tensors directly: Q4_0/Q4_1/Q8_0 arrive as MLX affine
quantized triples (uint32 weight, fp16 scales and biases, group size 32) and
F16/F32 as plain arrays. What is left to do here:

* rename GGUF tensors (``blk.N.attn_q.weight``) to mlx-lm/HF names;
* undo llama.cpp's RoPE permutation of the Q and K rows, so the result is a
  standard HF-layout model (``rope_traditional: false``) that transformers
  loads too;
* write ``config.json`` (mixed bits recorded per module), ``tokenizer.json``
  and ``tokenizer_config.json`` (chat template inline).

Two variants: ``quantized`` keeps the packed weights as they are in the file;
``float32`` dequantizes in fp32 (the fast path on CPU, see FACTS/benchmarks).
"""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path
from typing import Any

from mlx_distill.errors import ConfigError
from mlx_distill.files import write_json_atomic

LAYER_NAMES = {
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
}
TOP_NAMES = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}
SUPPORTED_ARCHS = ("llama",)
SUPPORTED_FILE_TYPES = {0: "F32", 1: "F16", 2: "Q4_0", 3: "Q4_1", 7: "Q8_0"}

# Pre-tokenizer split patterns for byte-level BPE vocabularies (llama.cpp's names).
_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_SPLITS = {"llama-bpe": _LLAMA3_SPLIT, "llama3": _LLAMA3_SPLIT, "llama-v3": _LLAMA3_SPLIT}


def _scalar(v: Any) -> Any:
    """GGUF metadata scalars come back as 0-d mx.arrays."""
    if hasattr(v, "item"):
        return v.item() if v.size == 1 and v.ndim == 0 else v.tolist()
    return v


def read_gguf(path: Path) -> tuple[dict, dict]:
    import mlx.core as mx

    try:
        weights, meta = mx.load(str(path), return_metadata=True)
    except Exception as e:  # mlx raises plain RuntimeError/ValueError for bad files
        raise ConfigError(f"{path}: not a readable GGUF file ({e})") from None
    return weights, {k: (v if isinstance(v, (list, str)) else _scalar(v)) for k, v in meta.items()}


def gguf_config(meta: dict, path: Path) -> dict:
    """The mlx-lm/HF ``config.json`` fields for a llama-family GGUF."""
    arch = meta.get("general.architecture")
    if arch not in SUPPORTED_ARCHS:
        raise ConfigError(
            f"{path}: architecture {arch!r} is not supported for GGUF import "
            f"(supported: {', '.join(SUPPORTED_ARCHS)}). Convert the original Hugging Face "
            "model with `mlx_lm convert` and pass that directory instead."
        )
    ftype = meta.get("general.file_type")
    if ftype is not None and ftype not in SUPPORTED_FILE_TYPES:
        raise ConfigError(
            f"{path}: GGUF file type {ftype} is not supported; use a Q4_0, Q4_1, Q8_0, F16 "
            "or F32 file (k-quants such as Q4_K_M are not read by MLX)."
        )
    p = f"{arch}."
    heads = int(meta[p + "attention.head_count"])
    hidden = int(meta[p + "embedding_length"])
    tokens = meta.get("tokenizer.ggml.tokens") or []
    cfg = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": hidden,
        "num_hidden_layers": int(meta[p + "block_count"]),
        "intermediate_size": int(meta[p + "feed_forward_length"]),
        "num_attention_heads": heads,
        "num_key_value_heads": int(meta.get(p + "attention.head_count_kv", heads)),
        "head_dim": int(meta.get(p + "rope.dimension_count", hidden // heads)),
        "rms_norm_eps": float(meta.get(p + "attention.layer_norm_rms_epsilon", 1e-5)),
        "rope_theta": float(meta.get(p + "rope.freq_base", 10000.0)),
        "max_position_embeddings": int(meta.get(p + "context_length", 2048)),
        "vocab_size": int(meta.get(p + "vocab_size", len(tokens))),
        "hidden_act": "silu",
        "attention_bias": False,
        "mlp_bias": False,
        "rope_traditional": False,
    }
    for name in ("bos", "eos", "padding"):
        v = meta.get(f"tokenizer.ggml.{name}_token_id")
        if v is not None:
            cfg["pad_token_id" if name == "padding" else f"{name}_token_id"] = int(v)
    return cfg


def unpermute_rows(w: Any, n_head: int) -> Any:
    """Invert llama.cpp's ``permute`` on the rows (output dims) of ``w``.

    llama.cpp stores row (head h, half i, pair j) at position (h, j, i); HF wants (h, i, j).
    Works on packed weights, scales and biases alike, since quantization groups run
    along the columns (input dims).
    """
    rows = w.shape[0]
    return w.reshape(n_head, rows // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def convert_weights(weights: dict, cfg: dict) -> tuple[dict, dict]:
    """Rename and un-permute; returns (weights, per-module quantization {name: (bits, gs)})."""
    out: dict[str, Any] = {}
    quant: dict[str, dict] = {}
    in_dims = {
        "model.embed_tokens": cfg["hidden_size"],
        "lm_head": cfg["hidden_size"],
        "self_attn.o_proj": cfg["num_attention_heads"] * cfg["head_dim"],
        "mlp.down_proj": cfg["intermediate_size"],
    }
    for key, value in weights.items():
        base, _, leaf = key.rpartition(".")
        parts = base.split(".")
        if parts[0] == "blk":
            local = LAYER_NAMES.get(parts[2])
            if local is None:
                raise ConfigError(f"GGUF tensor {key!r} has no llama equivalent")
            name = f"model.layers.{parts[1]}.{local}"
            if parts[2] == "attn_q":
                value = unpermute_rows(value, cfg["num_attention_heads"])
            elif parts[2] == "attn_k":
                value = unpermute_rows(value, cfg["num_key_value_heads"])
        elif base in TOP_NAMES:
            name = local = TOP_NAMES[base]
        elif base == "rope_freqs":
            continue  # llama3 rope scaling factors; recomputed from the config by mlx-lm
        else:
            raise ConfigError(f"GGUF tensor {key!r} has no llama equivalent")
        out[f"{name}.{leaf}"] = value
        if leaf == "scales":
            in_dim = in_dims.get(local, cfg["hidden_size"])
            packed = weights[f"{base}.weight"].shape[-1]
            quant[name] = {"bits": packed * 32 // in_dim, "group_size": in_dim // value.shape[-1]}
    return out, quant


def dequantize_fp32(weights: dict, quant: dict) -> dict:
    """Dequantize every packed triple in fp32 (scales/biases upcast first, so no fp16 math)."""
    import mlx.core as mx

    out = {}
    for key, value in weights.items():
        name, _, leaf = key.rpartition(".")
        if leaf in ("scales", "biases"):
            continue
        if leaf == "weight" and name in quant:
            q = quant[name]
            value = mx.dequantize(
                value,
                weights[f"{name}.scales"].astype(mx.float32),
                weights[f"{name}.biases"].astype(mx.float32),
                group_size=q["group_size"],
                bits=q["bits"],
            )
        out[key] = value.astype(mx.float32)
    return out


def _byte_level_tokenizer(meta: dict) -> Any:
    from tokenizers import (
        AddedToken,
        Regex,
        Tokenizer,
        decoders,
        models,
        pre_tokenizers,
        processors,
    )

    tokens = meta["tokenizer.ggml.tokens"]
    merges = [tuple(m.split(" ", 1)) for m in meta.get("tokenizer.ggml.merges", [])]
    tok = Tokenizer(models.BPE(vocab={t: i for i, t in enumerate(tokens)}, merges=merges))
    pre = meta.get("tokenizer.ggml.pre", "default")
    if pre == "smollm":
        # SmolLM2's own tokenizer.json: every digit alone, then GPT-2 byte-level.
        tok.pre_tokenizer = pre_tokenizers.Sequence(
            [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)]
        )
    elif pre in _SPLITS:
        tok.pre_tokenizer = pre_tokenizers.Sequence(
            [
                pre_tokenizers.Split(Regex(_SPLITS[pre]), behavior="isolated"),
                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
            ]
        )
    else:
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    types = list(meta.get("tokenizer.ggml.token_type", []) or [])
    special = [AddedToken(t, special=True, normalized=False) for t, ty in zip(tokens, types) if ty == 3]
    tok.add_special_tokens(special)
    return tok


def write_tokenizer(meta: dict, dest: Path, gguf_path: Path) -> None:
    """``tokenizer.json`` + a ``tokenizer_config.json`` that loads in transformers 4.57 and 5.x."""
    model = meta.get("tokenizer.ggml.model")
    tokens = meta.get("tokenizer.ggml.tokens")
    if model != "gpt2" or not tokens:
        raise ConfigError(
            f"{gguf_path}: tokenizer type {model!r} is not supported for import (only byte-level "
            "BPE, 'gpt2'). Convert the original Hugging Face model with `mlx_lm convert` instead."
        )
    _byte_level_tokenizer(meta).save(str(dest / "tokenizer.json"))
    types = list(meta.get("tokenizer.ggml.token_type", []) or [])

    def tok_of(name: str) -> str | None:
        v = meta.get(f"tokenizer.ggml.{name}_token_id")
        return tokens[int(v)] if v is not None else None

    cfg = {
        "tokenizer_class": "GPT2Tokenizer",
        "bos_token": tok_of("bos"),
        "eos_token": tok_of("eos"),
        "pad_token": tok_of("padding"),
        "unk_token": tok_of("unknown"),
        "add_bos_token": bool(meta.get("tokenizer.ggml.add_bos_token", False)),
        "add_prefix_space": False,
        "clean_up_tokenization_spaces": False,
        "model_max_length": int(meta.get("llama.context_length", 2048)),
        # A list here, never `extra_special_tokens`: transformers 4.57 crashes on that list.
        "additional_special_tokens": [t for t, ty in zip(tokens, types) if ty == 3],
    }
    if "tokenizer.chat_template" in meta:
        cfg["chat_template"] = meta["tokenizer.chat_template"]
    write_json_atomic(dest / "tokenizer_config.json", {k: v for k, v in cfg.items() if v is not None})


def import_gguf(gguf_path: str | Path, dest: str | Path, variant: str = "float32") -> Path:
    """Write an mlx-lm model directory for ``gguf_path`` at ``dest`` (atomically).

    ``variant`` is ``float32`` (dequantized) or ``quantized`` (packed, as in the file).
    """
    import mlx.core as mx

    if variant not in ("float32", "quantized"):
        raise ConfigError(f"--dtype {variant!r}: expected float32 or quantized")
    gguf_path, dest = Path(gguf_path), Path(dest)
    weights, meta = read_gguf(gguf_path)
    cfg = gguf_config(meta, gguf_path)
    weights, quant = convert_weights(weights, cfg)
    cfg["tie_word_embeddings"] = "lm_head.weight" not in weights
    if variant == "float32" or not quant:
        weights = dequantize_fp32(weights, quant) if quant else {k: v.astype(mx.float32) for k, v in weights.items()}
        cfg["torch_dtype"] = "float32"
    else:
        # Default = the most common (bits, group); other modules are listed by name, which
        # mlx-lm's loader reads as per-module overrides (SmolLM2 Q4_1: embedding 8-bit, rest 4).
        counts: dict[tuple[int, int], int] = {}
        for q in quant.values():
            counts[(q["bits"], q["group_size"])] = counts.get((q["bits"], q["group_size"]), 0) + 1
        bits, gs = max(counts, key=counts.get)
        qcfg: dict[str, Any] = {"group_size": gs, "bits": bits, "mode": "affine"}
        for name, q in sorted(quant.items()):
            if (q["bits"], q["group_size"]) != (bits, gs):
                qcfg[name] = {"group_size": q["group_size"], "bits": q["bits"], "mode": "affine"}
        cfg["quantization"] = qcfg
        cfg["quantization_config"] = qcfg
        cfg["torch_dtype"] = "float16"
    cfg["mlx_distill_source"] = {"gguf": gguf_path.name, "variant": variant}

    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=dest.parent, prefix=f".{dest.name}."))
    tmp.chmod(0o755)
    try:
        mx.save_safetensors(str(tmp / "model.safetensors"), weights, metadata={"format": "mlx"})
        write_json_atomic(tmp / "config.json", cfg)
        write_tokenizer(meta, tmp, gguf_path)
        gen = {k: cfg[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id") if k in cfg}
        write_json_atomic(tmp / "generation_config.json", gen)
        if meta.get("general.license"):
            (tmp / "LICENSE.txt").write_text(f"{meta['general.license']}\n")
        try:
            tmp.rename(dest)  # atomic; a concurrent builder may have won the race
        except OSError:
            if not (dest / "config.json").exists():
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return dest


def describe(path: Path) -> str:
    cfg = json.loads((path / "config.json").read_text())
    q = cfg.get("quantization")
    kind = f"{q['bits']}-bit (mixed)" if q else cfg.get("torch_dtype", "?")
    return f"{cfg['model_type']} {cfg['num_hidden_layers']} layers, hidden {cfg['hidden_size']}, {kind}"
