"""Test helpers (not fixtures): tiny models and small data builders."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

TINY_ARGS = {
    "model_type": "llama",
    "architectures": ["LlamaForCausalLM"],
    "hidden_size": 64,
    "num_hidden_layers": 2,
    "intermediate_size": 128,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 16,
    "rms_norm_eps": 1e-5,
    "rope_theta": 10000.0,
    "max_position_embeddings": 2048,
    "vocab_size": 49152,
    "tie_word_embeddings": True,
    "rope_traditional": False,
    "hidden_act": "silu",
    "attention_bias": False,
    "mlp_bias": False,
    "bos_token_id": 1,
    "eos_token_id": 2,
    "pad_token_id": 2,
    "torch_dtype": "float32",
}


def sharp_tiny_llama(**overrides: object) -> object:
    """A random tiny llama (64-word vocabulary) with sharp attention, so that a wrong position or a stale or
    visible cache slot changes the greedy tokens (prompt lookup and fastdecode tests)."""
    import mlx.core as mx
    from mlx_lm.models import llama

    mx.random.seed(0)
    model = llama.Model(llama.ModelArgs.from_dict({**TINY_ARGS, "vocab_size": 64, **overrides}))
    for layer in model.layers:
        for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj):
            proj.weight = proj.weight * 8
    mx.eval(model.parameters())
    return model


def greedy_reference(model: object, prompt: list[int], n: int, stop: set[int]) -> tuple[list[int], str]:
    """Greedy decoding with no cache: the whole sequence through the model for every token."""
    import mlx.core as mx

    seq, out = list(prompt), []
    for _ in range(n):
        t = int(mx.argmax(model(mx.array([seq]))[0, -1]).item())  # type: ignore[operator]
        if t in stop:
            return out, "eos"
        out.append(t)
        seq.append(t)
    return out, "length"


def write_tiny_llama(dest: Path, tokenizer_from: Path, seed: int = 0, **overrides: object) -> Path:
    """Write a random tiny llama (fp32) as an mlx-lm directory, borrowing a tokenizer."""
    import mlx.core as mx
    from mlx.utils import tree_flatten
    from mlx_lm.models import llama

    cfg = {**TINY_ARGS, **overrides}
    mx.random.seed(seed)
    model = llama.Model(llama.ModelArgs.from_dict(cfg))
    mx.eval(model.parameters())
    dest.mkdir(parents=True, exist_ok=True)
    mx.save_safetensors(str(dest / "model.safetensors"), dict(tree_flatten(model.parameters())))
    (dest / "config.json").write_text(json.dumps(cfg, indent=2))
    for name in ("tokenizer.json", "tokenizer_config.json", "generation_config.json"):
        shutil.copy(tokenizer_from / name, dest / name)
    return dest


def chat_rows(n: int, prefix: str = "q") -> list[dict]:
    """n small chat examples in mlx-lm format."""
    return [
        {
            "messages": [
                {"role": "user", "content": f"{prefix}{i}: add {i} and {i + 1}"},
                {"role": "assistant", "content": f"def add(): return {i} + {i + 1}  # = {2 * i + 1}"},
            ]
        }
        for i in range(n)
    ]
