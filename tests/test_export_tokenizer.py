"""The exported tokenizer loads in transformers 5.x and 4.57 (FACTS: the extra_special_tokens trap).

A base whose tokenizer was saved by transformers 5 (list-valued
``extra_special_tokens``, template in ``chat_template.jinja``) crashes 4.57. The
export must normalise it. A real 4.57 runs when ``MLX_DISTILL_TF4_PYTHON``
points at one (``scripts/check_export_tokenizer_compat.py`` builds it).
"""

from __future__ import annotations

import json
import os
import shutil
import sys
from pathlib import Path

import pytest

from mlx_distill.export_hf import write_tokenizer

CHAT = [{"role": "user", "content": "Write a Python function that reverses a string."}]


@pytest.fixture()
def t5_saved_base(tiny_model_dir: Path, tmp_path: Path) -> Path:
    """The tiny model with its tokenizer re-saved by the installed transformers 5.x."""
    transformers = pytest.importorskip("transformers")
    if int(transformers.__version__.split(".")[0]) < 5:
        pytest.skip("needs transformers 5.x to write the 5.x tokenizer layout")
    base = tmp_path / "base"
    base.mkdir()
    for name in ("config.json", "model.safetensors"):
        shutil.copy(tiny_model_dir / name, base / name)
    transformers.AutoTokenizer.from_pretrained(str(tiny_model_dir)).save_pretrained(str(base))
    return base


def test_transformers5_layout_is_normalised(t5_saved_base: Path, tiny_model_dir: Path, tmp_path: Path) -> None:
    from transformers import AutoTokenizer

    raw = json.loads((t5_saved_base / "tokenizer_config.json").read_text())
    assert isinstance(raw.get("extra_special_tokens"), list)  # the trap is really present in the input
    assert (t5_saved_base / "chat_template.jinja").is_file() and "chat_template" not in raw
    dest = tmp_path / "out"
    dest.mkdir()
    write_tokenizer(dest, t5_saved_base, json.loads((t5_saved_base / "config.json").read_text()))
    tcfg = json.loads((dest / "tokenizer_config.json").read_text())
    assert "extra_special_tokens" not in tcfg
    assert tcfg["additional_special_tokens"] == raw["extra_special_tokens"]
    assert tcfg["chat_template"] == (t5_saved_base / "chat_template.jinja").read_text()
    assert not (dest / "chat_template.jinja").exists()
    gen = json.loads((dest / "generation_config.json").read_text())
    assert gen["eos_token_id"] == 2 and gen["pad_token_id"] == 2
    want = AutoTokenizer.from_pretrained(str(tiny_model_dir)).apply_chat_template(
        CHAT, add_generation_prompt=True, return_dict=False)
    got = AutoTokenizer.from_pretrained(str(dest)).apply_chat_template(
        CHAT, add_generation_prompt=True, return_dict=False)
    assert got == want


@pytest.mark.slow
@pytest.mark.skipif(not os.environ.get("MLX_DISTILL_TF4_PYTHON"),
                    reason="set MLX_DISTILL_TF4_PYTHON to a python with transformers 4.57 "
                           "(scripts/check_export_tokenizer_compat.py builds one)")
def test_loads_in_transformers_457(t5_saved_base: Path, tmp_path: Path) -> None:
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
    import check_export_tokenizer_compat as compat

    dest = tmp_path / "out"
    dest.mkdir()
    write_tokenizer(dest, t5_saved_base, json.loads((t5_saved_base / "config.json").read_text()))
    py = os.environ["MLX_DISTILL_TF4_PYTHON"]
    normalised, raw = compat.check([dest, t5_saved_base], py)
    assert normalised["transformers_old"].startswith("4.")
    assert normalised["ok"] and normalised["same_ids"], normalised
    assert not raw["ok"], "the unnormalised 5.x layout should fail in 4.57 (else this test proves nothing)"
