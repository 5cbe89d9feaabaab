"""MLX LoRA -> PEFT conversion: config fields, target selection, and parity in peft itself."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from mlx_distill import export_peft, verify
from tests.test_export_helpers import make_adapter


def adapted(model_dir: Path, adapter: Path):
    from mlx_distill import models

    model, tok, _ = models.load(str(model_dir), adapter, policy="float32")
    return model, tok


def test_config_for_some_keys_on_the_last_layer(tiny_model_dir: Path, tmp_path: Path) -> None:
    ad = make_adapter(tiny_model_dir, tmp_path / "ad", num_layers=1, rank=2, scale=0.3, iters=2,
                      keys=["self_attn.q_proj", "self_attn.v_proj"])
    model, _ = adapted(tiny_model_dir, ad)
    cfg = export_peft.write_peft(tmp_path / "peft", model, json.loads((ad / "adapter_config.json").read_text()),
                                 "org/base")
    assert cfg["target_modules"] == ["q_proj", "v_proj"] and cfg["layers_to_transform"] == [1]
    assert cfg["r"] == 2 and cfg["lora_alpha"] == pytest.approx(0.6)  # scale 0.3 x rank 2, not rounded
    assert cfg["base_model_name_or_path"] == "org/base"
    on_disk = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    assert on_disk == cfg


@pytest.mark.torch
def test_peft_parity_on_a_partial_adapter(tiny_model_dir: Path, tmp_path: Path) -> None:
    pytest.importorskip("peft")
    ad = make_adapter(tiny_model_dir, tmp_path / "ad", num_layers=1, iters=3, learning_rate=1e-2,
                      keys=["self_attn.q_proj", "mlp.down_proj"])
    model, tok = adapted(tiny_model_dir, ad)
    ids = verify.chat_ids(tok, True)
    ref = verify.mlx_logits(model, ids)
    assert verify.compare(ref, verify.base_logits(model, ids))["max_abs_logit_diff"] > 0.1
    export_peft.write_peft(tmp_path / "peft", model, json.loads((ad / "adapter_config.json").read_text()), "x")
    cmp = export_peft.check_peft(tmp_path / "peft", tiny_model_dir, ids, ref, echo=lambda s: None)
    assert cmp["modules"] == 2 and cmp["max_abs_logit_diff"] <= 1e-3 and cmp["argmax_agreement"] == 1.0


@pytest.mark.torch
def test_peft_check_fails_on_a_wrong_alpha(tiny_model_dir: Path, tmp_path: Path) -> None:
    """The check can fail: a PEFT config with lora_alpha = scale (the classic mix-up) is caught."""
    pytest.importorskip("peft")
    from mlx_distill.errors import VerificationError

    ad = make_adapter(tiny_model_dir, tmp_path / "ad", iters=3, learning_rate=1e-2)
    model, tok = adapted(tiny_model_dir, ad)
    ids = verify.chat_ids(tok, True)
    ref = verify.mlx_logits(model, ids)
    cfg = export_peft.write_peft(tmp_path / "peft", model, json.loads((ad / "adapter_config.json").read_text()), "x")
    (tmp_path / "peft" / "adapter_config.json").write_text(json.dumps({**cfg, "lora_alpha": 10}))
    with pytest.raises(VerificationError, match="PEFT adapter on the HF base"):
        export_peft.check_peft(tmp_path / "peft", tiny_model_dir, ids, ref, echo=lambda s: None)
