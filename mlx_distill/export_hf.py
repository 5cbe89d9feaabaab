"""The fused Hugging Face folder: safetensors, a truthful config.json, portable tokenizer files.

* weights are written as safetensors with ``format: pt`` metadata (transformers
  4.x refuses other values), sharded like mlx-lm does for big models;
* ``config.json`` drops mlx-lm's ``quantization`` keys and states the dtype
  actually stored, as ``torch_dtype`` (read by 4.x) and ``dtype`` (5.x): a stale
  ``float16`` there made transformers load fp32 weights in fp16 (FACTS);
* tokenizer files are copied from the base and normalised so 4.57 and 5.x both
  load them; ``generation_config.json`` carries the eos/pad ids.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

from mlx_distill.errors import ConfigError
from mlx_distill.files import write_json_atomic

DTYPES = ("auto", "float32", "float16", "bfloat16")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "merges.txt",
                   "special_tokens_map.json", "added_tokens.json")


def native_dtype(config: dict[str, Any]) -> str:
    d = str(config.get("torch_dtype") or config.get("dtype") or "float32")
    return d if d in DTYPES[1:] else "float32"


def save_weights(dest: Path, weights: dict[str, Any], dtype: str) -> list[str]:
    """Safetensors shards (``format: pt``, as transformers 4.x requires) in ``dtype``; index if sharded."""
    import mlx.core as mx
    from mlx_lm.utils import make_shards

    for old in list(dest.glob("model*.safetensors")) + list(dest.glob("model.safetensors.index.json")):
        old.unlink()
    cast = {k: v.astype(getattr(mx, dtype)) if mx.issubdtype(v.dtype, mx.floating) else v
            for k, v in weights.items()}
    shards = make_shards(cast)
    names = ["model.safetensors"] if len(shards) == 1 else [
        f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    index: dict[str, str] = {}
    for name, shard in zip(names, shards):
        mx.save_safetensors(str(dest / name), shard, metadata={"format": "pt"})
        index.update({k: name for k in shard})
    if len(shards) > 1:
        total = sum(v.nbytes for v in cast.values())
        write_json_atomic(dest / "model.safetensors.index.json",
                          {"metadata": {"total_size": total}, "weight_map": dict(sorted(index.items()))})
    return names


def write_config(dest: Path, base_config: dict[str, Any], dtype: str, extra: dict[str, Any]) -> dict[str, Any]:
    """config.json without quantization, stating the dtype stored (transformers 4 and 5 keys)."""
    cfg = {k: v for k, v in base_config.items() if k not in ("quantization", "quantization_config")}
    cfg.update(torch_dtype=dtype, dtype=dtype, mlx_distill_export=extra)
    write_json_atomic(dest / "config.json", cfg)
    return cfg


def write_tokenizer(dest: Path, base_dir: Path, base_config: dict[str, Any]) -> None:
    """Copy the base's tokenizer files; inline the chat template; no list-valued extra_special_tokens.

    transformers 4.57 crashes on a list-valued ``extra_special_tokens`` (which 5.x
    writes), and older versions ignore ``chat_template.jinja``; so the template goes
    inline and the list becomes ``additional_special_tokens``.
    """
    copied = [n for n in TOKENIZER_FILES if (base_dir / n).is_file()]
    if "tokenizer.json" not in copied and "tokenizer.model" not in copied:
        raise ConfigError(f"--model {base_dir}: no tokenizer.json or tokenizer.model to export")
    for n in copied:
        shutil.copyfile(base_dir / n, dest / n)
    p = base_dir / "tokenizer_config.json"
    tcfg = json.loads(p.read_text(encoding="utf-8")) if p.is_file() else {}
    extra = tcfg.pop("extra_special_tokens", None)
    if isinstance(extra, list):
        merged = list(tcfg.get("additional_special_tokens") or [])
        tcfg["additional_special_tokens"] = merged + [t for t in extra if t not in merged]
    elif isinstance(extra, dict) and extra:
        tcfg["extra_special_tokens"] = extra
    if not tcfg.get("chat_template"):
        if (base_dir / "chat_template.jinja").is_file():
            tcfg["chat_template"] = (base_dir / "chat_template.jinja").read_text(encoding="utf-8")
        elif (base_dir / "chat_template.json").is_file():
            tcfg["chat_template"] = json.loads((base_dir / "chat_template.json").read_text())["chat_template"]
    write_json_atomic(dest / "tokenizer_config.json", tcfg)
    gp = base_dir / "generation_config.json"
    gen = json.loads(gp.read_text()) if gp.is_file() else {}
    gen.pop("transformers_version", None)
    for k in ("bos_token_id", "eos_token_id", "pad_token_id"):
        if gen.get(k) is None and base_config.get(k) is not None:
            gen[k] = base_config[k]
    eos = gen.get("eos_token_id")
    if gen.get("pad_token_id") is None and eos is not None:
        gen["pad_token_id"] = eos[0] if isinstance(eos, list) else eos
    write_json_atomic(dest / "generation_config.json", gen)
    for lic in base_dir.glob("LICENSE*"):
        shutil.copyfile(lic, dest / lic.name)


def write_hf_folder(dest: Path, weights: dict[str, Any], base_dir: Path, base_config: dict[str, Any],
                    dtype: str, extra: dict[str, Any]) -> dict[str, Any]:
    dest.mkdir(parents=True, exist_ok=True)
    save_weights(dest, weights, dtype)
    write_tokenizer(dest, base_dir, base_config)
    return write_config(dest, base_config, dtype, extra)
