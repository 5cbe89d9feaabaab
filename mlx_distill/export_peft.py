"""An mlx-lm LoRA adapter, rewritten as a PEFT LoRA adapter (``peft/``).

There is no MLX-to-PEFT converter upstream. The two differ only in layout:

* MLX ``LoRALinear`` computes ``y = W x + scale * (x @ lora_a) @ lora_b`` with
  ``lora_a`` (in, r) and ``lora_b`` (r, out);
* PEFT computes ``y = W x + (lora_alpha / r) * lora_B(lora_A(x))`` with
  ``lora_A.weight`` (r, in) and ``lora_B.weight`` (out, r).

So A and B are transposed, and ``lora_alpha = scale * r`` (mlx-lm's default
scale 20 at rank 8 is alpha 160). Names gain PEFT's ``base_model.model.``
prefix: ``base_model.model.model.layers.N.self_attn.q_proj.lora_A.weight``.
DoRA (its magnitude vector is normalised differently) and full fine-tunes (no
adapter at all) are refused with a clear message.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from mlx_distill.errors import ConfigError, VerificationError
from mlx_distill.files import write_json_atomic

ADAPTER_FILE = "adapter_model.safetensors"
CONFIG_FILE = "adapter_config.json"
_LAYER = re.compile(r"^(?P<prefix>.*\.layers)\.(?P<index>\d+)\.(?P<rel>.+)$")


def check_supported(adapter_cfg: dict[str, Any], where: object) -> None:
    """Refuse adapter types PEFT export cannot represent (before any work is done)."""
    kind = adapter_cfg.get("fine_tune_type", "lora")
    if kind == "dora":
        raise ConfigError(
            f"{where}: --peft: DoRA adapters are not supported for PEFT export (mlx-lm and PEFT "
            "normalise the DoRA magnitude differently, so the result would not match). Drop --peft "
            "(the fused folder already holds the trained model), or retrain with LoRA."
        )
    if kind == "full":
        raise ConfigError(
            f"{where}: --peft: a full fine-tune is not supported for PEFT export: it has no "
            "low-rank adapter to write. Drop --peft; the fused folder is the full trained model."
        )
    if kind != "lora":
        raise ConfigError(f"{where}: --peft: fine_tune_type {kind!r} is not supported for PEFT export")


def lora_modules(model: Any) -> list[tuple[str, Any]]:
    """Every LoRALinear of an adapter-applied MLX model; other wrapper types are refused."""
    from mlx_lm.tuner.lora import LoRALinear

    from mlx_distill.verify import adapter_modules

    mods = adapter_modules(model)
    other = [f"{n} ({type(m).__name__})" for n, m in mods if type(m) is not LoRALinear]
    if other:
        raise ConfigError(
            "--peft: only LoRA on linear layers is supported for PEFT export; this adapter also has "
            f"{', '.join(other[:3])}. Drop --peft; the fused folder holds the trained model."
        )
    if not mods:
        raise ConfigError("--peft: the adapter applied no LoRA layers to this model; nothing to export")
    return mods


def _number(x: float) -> int | float:
    return int(x) if float(x).is_integer() else float(x)


def peft_config(model: Any, mods: list[tuple[str, Any]], dropout: float, base_name: str) -> dict[str, Any]:
    """PEFT ``adapter_config.json`` for ``mods``: one rank and scale, the targets and layers."""
    ranks = {int(m.lora_a.shape[1]) for _, m in mods}
    scales = {float(m.scale) for _, m in mods}
    if len(ranks) != 1 or len(scales) != 1:
        raise ConfigError(f"--peft: mixed LoRA ranks {sorted(ranks)} / scales {sorted(scales)} are not supported")
    r, scale = ranks.pop(), scales.pop()
    parts = [_LAYER.match(n) for n, _ in mods]
    targets: list[str] | str
    layers: list[int] | None = None
    if all(parts):
        rel = {p["rel"] for p in parts if p}
        layers = sorted({int(p["index"]) for p in parts if p})
        targets = sorted({x.rsplit(".", 1)[-1] for x in rel})
        # PEFT matches target names by suffix; if a leaf name also names another linear in
        # the same layers, list the exact module paths instead (a regex, full match).
        linear_rel = {
            m["rel"] for n, _ in model.named_modules()
            if (m := _LAYER.match(n)) and int(m["index"]) in layers and n.rsplit(".", 1)[-1] in targets
        }
        if linear_rel != rel:
            targets = "|".join(re.escape(n) for n, _ in mods)
            layers = None
    else:
        targets = "|".join(re.escape(n) for n, _ in mods)
    cfg: dict[str, Any] = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_name,
        "r": r,
        "lora_alpha": _number(scale * r),  # PEFT's scaling is lora_alpha / r == MLX scale
        "lora_dropout": float(dropout),
        "target_modules": targets,
        "layers_to_transform": layers,
        "layers_pattern": "layers" if layers is not None else None,
        "bias": "none",
        "fan_in_fan_out": False,
        "use_dora": False,
        "use_rslora": False,
        "modules_to_save": None,
        "init_lora_weights": True,
        "inference_mode": True,
    }
    return cfg


def peft_tensors(mods: list[tuple[str, Any]]) -> dict[str, Any]:
    """MLX ``lora_a`` (in, r) / ``lora_b`` (r, out) -> PEFT ``lora_A`` (r, in) / ``lora_B`` (out, r), fp32."""
    import mlx.core as mx

    out = {}
    for name, m in mods:
        out[f"base_model.model.{name}.lora_A.weight"] = mx.contiguous(m.lora_a.T.astype(mx.float32))
        out[f"base_model.model.{name}.lora_B.weight"] = mx.contiguous(m.lora_b.T.astype(mx.float32))
    return out


def write_peft(dest: Path, model: Any, adapter_cfg: dict[str, Any], base_name: str) -> dict[str, Any]:
    """Write ``adapter_model.safetensors`` + ``adapter_config.json`` into ``dest``; returns the config."""
    import mlx.core as mx

    mods = lora_modules(model)
    dropout = float((adapter_cfg.get("lora_parameters") or {}).get("dropout", 0.0))
    cfg = peft_config(model, mods, dropout, base_name)
    dest.mkdir(parents=True, exist_ok=True)
    tensors = peft_tensors(mods)
    mx.eval(tensors)
    mx.save_safetensors(str(dest / ADAPTER_FILE), tensors, metadata={"format": "pt"})
    write_json_atomic(dest / CONFIG_FILE, cfg)
    return cfg


def peft_base_dir(peft_dir: Path, model_spec: str) -> Path:
    """The float HF base the PEFT adapter applies to: ``peft/base`` if written, else the base."""
    from mlx_distill import models

    if (peft_dir / "base" / "config.json").is_file():
        return peft_dir / "base"
    return Path(models.resolve(model_spec, "float32").path)


def check_peft(
    peft_dir: Path, base_dir: str | Path, ids_list: Sequence[Sequence[int]], ref: Sequence[Any],
    echo: Callable[[str], None],
) -> dict[str, Any]:
    """PeftModel on the HF base reproduces the adapter-applied MLX logits (fp32 bounds)."""
    from mlx_distill import verify

    notice = verify.torch_available(("torch", "transformers", "peft"))
    if notice:
        echo(f"verify: PEFT check {notice}")
        return {"skipped": notice}
    import warnings

    import peft
    from peft import PeftModel
    from safetensors import safe_open

    base = verify.hf_load(base_dir)
    with warnings.catch_warnings():  # peft 0.21 calls a transformers API deprecated in 5.x
        warnings.simplefilter("ignore", FutureWarning)
        model = PeftModel.from_pretrained(base, str(peft_dir)).eval()
    with safe_open(str(peft_dir / ADAPTER_FILE), "np") as f:
        expected = len(list(f.keys())) // 2
    injected = sum(1 for _, m in model.named_modules() if hasattr(m, "lora_A") and "default" in m.lora_A)
    if injected != expected:
        raise VerificationError(
            f"{peft_dir}: PEFT wrapped {injected} modules but the adapter file holds {expected}; "
            "target_modules / layers_to_transform in adapter_config.json select the wrong layers."
        )
    cmp = verify.compare(verify.torch_logits(model, ids_list), ref)
    cmp.update(peft=peft.__version__, base=str(base_dir), modules=injected)
    verify.check_bounds(
        "PEFT adapter on the HF base vs adapter-applied MLX", cmp,
        "the converted LoRA weights or lora_alpha do not reproduce the MLX adapter.",
    )
    echo(f"verify: PEFT vs MLX adapter max |Δlogit| {cmp['max_abs_logit_diff']:.2e}, "
         f"argmax {cmp['argmax_agreement']:.0%} ({injected} LoRA modules)")
    return cmp
