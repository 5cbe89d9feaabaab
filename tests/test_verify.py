"""`mlx-distill verify` and the fuse-into-quantized-base regression (mlx-lm issue #1172)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from click.testing import CliRunner

from mlx_distill import export_peft, verify
from mlx_distill.errors import VerificationError
from mlx_distill.export import ExportConfig, export_model
from tests.test_export_helpers import make_adapter

pytestmark = pytest.mark.torch


def quantize_dir(src: Path, dest: Path) -> Path:
    """A 4-bit (group 32) mlx-lm copy of ``src``, like mlx-community's quantized models."""
    import mlx.core as mx
    from mlx_lm.utils import load, quantize_model, save_config, save_model

    model, _ = load(str(src))
    config = json.loads((src / "config.json").read_text())
    model, config = quantize_model(model, config, group_size=32, bits=4)
    mx.eval(model.parameters())
    save_model(dest, model)
    config["torch_dtype"] = "float32"
    save_config(config, dest / "config.json")
    for name in ("tokenizer.json", "tokenizer_config.json", "generation_config.json"):
        shutil.copy(src / name, dest / name)
    return dest


@pytest.fixture(scope="module")
def exported(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    pytest.importorskip("torch")
    pytest.importorskip("peft")
    root = tmp_path_factory.mktemp("verify")
    ad = make_adapter(tiny_model_dir, root / "adapters", iters=4, learning_rate=1e-2)
    export_model(ExportConfig(model=str(tiny_model_dir), adapter_path=str(ad), out=str(root / "out"), peft=True),
                 echo=lambda s: None)
    return root / "out", ad


def test_verify_cli_passes_and_keeps_the_old_report(exported, tiny_model_dir: Path) -> None:
    out, ad = exported
    before = (out / "verify.json").read_text()
    res = CliRunner().invoke(verify.cli, [str(out), "--model", str(tiny_model_dir), "--adapter-path", str(ad)])
    assert res.exit_code == 0, res.output
    assert "verify: passed" in res.output
    assert (out / "verify.json").read_text() == before  # never overwritten
    new = json.loads(next(out.glob("verify-*.json")).read_text())
    assert new["passed"] and new["mlx_fused_vs_adapter"]["max_abs_logit_diff"] <= 1e-3
    assert new["peft_vs_mlx_adapter"]["argmax_agreement"] == 1.0
    assert new["transformers_vs_mlx"]["greedy_identical"] is True


def test_verify_fails_with_numbers_on_the_wrong_adapter(exported, tiny_model_dir: Path, tmp_path: Path) -> None:
    out, _ = exported
    other = make_adapter(tiny_model_dir, tmp_path / "other", iters=2, learning_rate=3e-3, rows=2)
    report = tmp_path / "r.json"
    res = CliRunner().invoke(verify.cli, [str(out), "--model", str(tiny_model_dir), "--adapter-path", str(other),
                                          "--out", str(report)])
    assert res.exit_code == 1
    assert "max |Δlogit|" in res.output and "argmax agreement" in res.output and "bound 0.001" in res.output
    assert not report.exists()


def test_verify_without_torch_skips_step_2(exported, tiny_model_dir: Path, tmp_path: Path,
                                           monkeypatch: pytest.MonkeyPatch) -> None:
    out, ad = exported
    monkeypatch.setattr(verify, "torch_available", lambda need=(): "skipped: torch not installed")
    lines: list[str] = []
    report = verify.verify_export(out, str(tiny_model_dir), ad, echo=lines.append)
    assert report["transformers_vs_mlx"] == {"skipped": "skipped: torch not installed"}
    assert any("transformers check skipped" in ln for ln in lines)
    assert report["mlx_fused_vs_adapter"]["passed"]


def test_issue_1172_requantized_fuse_fails_dequantized_fuse_passes(tiny_model_dir: Path, tmp_path: Path) -> None:
    """mlx-lm #1172: fusing into a quantized base re-quantizes the merged weight and can erase a
    small adapter. Our export dequantizes first; the re-quantizing fuse must fail the same check."""
    pytest.importorskip("peft")
    import mlx.core as mx
    from mlx.utils import tree_unflatten
    from mlx_lm.utils import load

    qdir = quantize_dir(tiny_model_dir, tmp_path / "q4")
    # QLoRA on the 4-bit base, with a small adapter (low lr, 2 steps).
    ad = make_adapter(qdir, tmp_path / "ad", iters=2, learning_rate=2e-3)
    model, tok = load(str(qdir), adapter_path=str(ad))
    model.set_dtype(mx.float32)
    ids = verify.chat_ids(tok, True)
    ref = verify.mlx_logits(model, ids)
    base = verify.base_logits(model, ids)
    effect = verify.compare(ref, base)
    assert effect["max_abs_logit_diff"] > 1e-2  # the adapter does change the model
    requant = [(n, m.fuse(dequantize=False)) for n, m in model.named_modules() if hasattr(m, "fuse")]
    model.update_modules(tree_unflatten(requant))  # what `mlx_lm fuse` does without --dequantize
    with pytest.raises(VerificationError, match="max |Δlogit|"):
        verify.check_bounds("requantized fuse", verify.compare(verify.mlx_logits(model, ids), ref), "")
    # The same folder `mlx_lm fuse` (no --dequantize) would write: `verify` rejects it too
    # (measured: 84% argmax agreement, bound 95%).
    from mlx_lm.utils import save_config, save_model

    save_model(tmp_path / "mlx_fused", model)
    save_config(json.loads((qdir / "config.json").read_text()), tmp_path / "mlx_fused" / "config.json")
    for name in ("tokenizer.json", "tokenizer_config.json", "generation_config.json"):
        shutil.copy(qdir / name, tmp_path / "mlx_fused" / name)
    with pytest.raises(VerificationError, match="4-bit MLX-quantized weights lost the adapter"):
        verify.verify_export(tmp_path / "mlx_fused", str(qdir), ad, echo=lambda s: None)

    res = export_model(ExportConfig(model=str(qdir), adapter_path=str(ad), out=str(tmp_path / "out"), peft=True),
                       echo=lambda s: None)
    v = res.verify
    assert v["mlx_fused_vs_adapter"]["max_abs_logit_diff"] <= 1e-3
    assert v["transformers_vs_mlx"]["argmax_agreement"] == 1.0
    cfg = json.loads((tmp_path / "out" / "config.json").read_text())
    assert "quantization" not in cfg and cfg["torch_dtype"] == "float32"
    # PEFT needs a float base: the dequantized one the adapter was trained on is written beside it.
    assert (tmp_path / "out" / "peft" / "base" / "model.safetensors").is_file()
    assert v["peft_vs_mlx_adapter"]["max_abs_logit_diff"] <= 1e-3


def test_peft_base_dir_resolves_specs(tmp_path: Path, demo_model_dir: Path) -> None:
    """`verify --model demo` must hand PEFT the demo's float folder, not the string 'demo'."""
    assert export_peft.peft_base_dir(tmp_path / "peft", "demo") == demo_model_dir
    (tmp_path / "peft" / "base").mkdir(parents=True)
    (tmp_path / "peft" / "base" / "config.json").write_text("{}")
    assert export_peft.peft_base_dir(tmp_path / "peft", "demo") == tmp_path / "peft" / "base"
