"""Bad input to `mlx-distill export`: a clear error, before anything is written or lost."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from mlx_distill.errors import ConfigError, DataError
from mlx_distill.export import ExportConfig, cli, export_model
from tests.helpers import write_tiny_llama
from tests.test_export_helpers import make_adapter


@pytest.fixture(scope="module")
def adapter(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_adapter(tiny_model_dir, tmp_path_factory.mktemp("err") / "adapters", iters=2, learning_rate=1e-2)


def run(tiny_model_dir: Path, adapter: Path, out: Path, **kw) -> None:
    export_model(ExportConfig(model=str(tiny_model_dir), adapter_path=str(adapter), out=str(out), **kw),
                 echo=lambda s: None)


def test_non_empty_out_is_refused_and_kept(tiny_model_dir: Path, adapter: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    res = CliRunner().invoke(cli, ["--model", str(tiny_model_dir), "--adapter-path", str(adapter),
                                   "--out", str(out), "--no-verify"])
    assert res.exit_code == 2
    assert "is not empty" in res.output and "--overwrite" in res.output
    # --overwrite replaces only a previous export, never a folder of other files
    res = CliRunner().invoke(cli, ["--model", str(tiny_model_dir), "--adapter-path", str(adapter),
                                   "--out", str(out), "--no-verify", "--overwrite"])
    assert res.exit_code == 2 and "not an mlx-distill export" in res.output
    assert sorted(p.name for p in out.iterdir()) == ["notes.txt"]


def test_overwrite_replaces_a_previous_export(tiny_model_dir: Path, adapter: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    run(tiny_model_dir, adapter, out, verify=False)
    (out / "README.md").write_text("old card")
    run(tiny_model_dir, adapter, out, verify=False, overwrite=True)
    assert (out / "README.md").read_text() != "old card"
    assert not list(tmp_path.glob(".out.*")), "staging/old folders left behind"


def test_out_inside_the_adapter_is_refused(tiny_model_dir: Path, adapter: Path) -> None:
    with pytest.raises(ConfigError, match="input of this export"):
        run(tiny_model_dir, adapter, adapter, overwrite=True)


def test_adapter_with_more_layers_than_the_base(tiny_model_dir: Path, tmp_path: Path) -> None:
    big = write_tiny_llama(tmp_path / "four", tiny_model_dir, num_hidden_layers=4)
    ad = make_adapter(big, tmp_path / "ad4", num_layers=4, iters=1)
    out = tmp_path / "out"
    with pytest.raises(ConfigError, match="trained on 4 layers but the model has 2"):
        run(tiny_model_dir, ad, out)
    assert not out.exists()


def test_adapter_with_other_shapes(tiny_model_dir: Path, tmp_path: Path) -> None:
    other = write_tiny_llama(tmp_path / "narrow", tiny_model_dir, hidden_size=32, head_dim=8, intermediate_size=64)
    ad = make_adapter(other, tmp_path / "ad32", iters=1)
    out = tmp_path / "out"
    with pytest.raises(ConfigError, match="does not fit this model") as e:
        run(tiny_model_dir, ad, out)
    assert "shape" in str(e.value)
    assert not out.exists()


def test_adapter_missing_tensors(tiny_model_dir: Path, adapter: Path, tmp_path: Path) -> None:
    import mlx.core as mx

    cut = tmp_path / "cut"
    cut.mkdir()
    w = mx.load(str(adapter / "adapters.safetensors"))
    mx.save_safetensors(str(cut / "adapters.safetensors"), {k: v for k, v in w.items() if ".layers.0." not in k})
    (cut / "adapter_config.json").write_text((adapter / "adapter_config.json").read_text())
    with pytest.raises(ConfigError, match="has only"):
        run(tiny_model_dir, cut, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_broken_adapter_config(tiny_model_dir: Path, adapter: Path, tmp_path: Path) -> None:
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "adapters.safetensors").write_bytes((adapter / "adapters.safetensors").read_bytes())
    (bad / "adapter_config.json").write_text('{"fine_tune_type": "lora",\n "num_layers": }')
    with pytest.raises(DataError, match=r"adapter_config.json:2: not valid JSON"):
        run(tiny_model_dir, bad, tmp_path / "out")
    with pytest.raises(ConfigError, match="missing adapter_config.json, adapters.safetensors"):
        run(tiny_model_dir, tmp_path, tmp_path / "out")


@pytest.mark.parametrize("kind", ["dora", "full"])
def test_peft_refuses_dora_and_full(kind: str, tiny_model_dir: Path, adapter: Path, tmp_path: Path) -> None:
    ad = tmp_path / kind
    ad.mkdir()
    cfg = json.loads((adapter / "adapter_config.json").read_text())
    (ad / "adapter_config.json").write_text(json.dumps({**cfg, "fine_tune_type": kind}))
    (ad / "adapters.safetensors").write_bytes((adapter / "adapters.safetensors").read_bytes())
    res = CliRunner().invoke(cli, ["--model", str(tiny_model_dir), "--adapter-path", str(ad),
                                   "--out", str(tmp_path / "out"), "--peft"])
    assert res.exit_code == 2
    assert "not supported for PEFT export" in res.output
    assert not (tmp_path / "out").exists()


def test_gguf_other_architecture_points_to_llama_cpp(tmp_path: Path) -> None:
    from mlx_distill.export_gguf import check_supported

    with pytest.raises(ConfigError, match="convert_hf_to_gguf.py") as e:
        check_supported(tmp_path, {"model_type": "qwen2"})
    assert "'qwen2'" in str(e.value)


def test_gguf_sentencepiece_vocab_points_to_llama_cpp(tmp_path: Path) -> None:
    from mlx_distill.export_gguf import check_supported

    (tmp_path / "tokenizer.json").write_text(json.dumps({"model": {"type": "BPE"}, "decoder": {"type": "Sequence"}}))
    with pytest.raises(ConfigError, match="byte-level BPE.*convert_hf_to_gguf.py"):
        check_supported(tmp_path, {"model_type": "llama"})


def test_gguf_without_the_package(tiny_model_dir: Path, adapter: Path, tmp_path: Path,
                                  monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "gguf", None)  # import gguf -> ImportError
    with pytest.raises(ConfigError, match=r"pip install 'mlx-distill\[export\]'"):
        run(tiny_model_dir, adapter, tmp_path / "out", gguf=True)
    assert not (tmp_path / "out").exists()


def test_bad_flags(tiny_model_dir: Path, adapter: Path, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="--dry-run applies to --push-to-hub"):
        run(tiny_model_dir, adapter, tmp_path / "o", dry_run=True)
    with pytest.raises(ConfigError, match="--dtype 'int8'"):
        run(tiny_model_dir, adapter, tmp_path / "o", dtype="int8")
    with pytest.raises(ConfigError, match="--adapter-path is required"):
        export_model(ExportConfig(model=str(tiny_model_dir), out=str(tmp_path / "o")))
    with pytest.raises(ConfigError, match="--out is required"):
        export_model(ExportConfig(model=str(tiny_model_dir), adapter_path=str(adapter)))
    cfg = tmp_path / "export.yaml"
    cfg.write_text("export:\n  dtype: float64\n")
    res = CliRunner().invoke(cli, ["--config", str(cfg), "--adapter-path", str(adapter), "--out", str(tmp_path / "o")])
    assert res.exit_code == 2 and "float64" in res.output


def test_model_defaults_to_the_adapters_base(tiny_model_dir: Path, adapter: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    export_model(ExportConfig(adapter_path=str(adapter), out=str(out), verify=False), echo=lambda s: None)
    assert json.loads((out / "config.json").read_text())["hidden_size"] == 64  # the tiny base, not demo
    anon = tmp_path / "anon"
    anon.mkdir()
    cfg = json.loads((adapter / "adapter_config.json").read_text())
    del cfg["model"]
    (anon / "adapter_config.json").write_text(json.dumps(cfg))
    (anon / "adapters.safetensors").write_bytes((adapter / "adapters.safetensors").read_bytes())
    with pytest.raises(ConfigError, match="--model is required"):
        export_model(ExportConfig(adapter_path=str(anon), out=str(tmp_path / "o2")))


def test_failed_verification_writes_nothing_and_keeps_the_old_export(
        tiny_model_dir: Path, adapter: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from mlx_distill import verify
    from mlx_distill.errors import VerificationError

    out = tmp_path / "out"
    run(tiny_model_dir, adapter, out, verify=False)
    before = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}
    monkeypatch.setattr(verify, "MAX_ABS_LOGIT_DIFF", 0.0)  # no real fuse is bit-exact: forces a failure
    with pytest.raises(VerificationError, match=r"fused MLX vs adapter-applied MLX \(fp32\): max \|Δlogit\|"):
        run(tiny_model_dir, adapter, out, overwrite=True)
    assert {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()} == before
    assert not list(tmp_path.glob(".out.*"))  # no staging or backup left behind
