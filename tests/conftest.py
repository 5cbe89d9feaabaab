"""Shared fixtures.

Every test runs with HOME, caches and hub settings pointed into tmp dirs and
with secrets removed from the environment. The embedded demo model is built
once per session into a session cache (set MLX_DISTILL_TEST_HOME to reuse one
across sessions).
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import pytest

import mlx_distill  # noqa: F401  (first: loads OpenBLAS before mlx.core)

_SESSION_HOME = os.environ.get("MLX_DISTILL_TEST_HOME") or tempfile.mkdtemp(prefix="mlx-distill-test-")
SECRET_VARS = ("ANTHROPIC_API_KEY", "ANTHROPIC_AUTH_TOKEN", "HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "ANTHROPIC_BASE_URL")


def pytest_configure(config: pytest.Config) -> None:
    os.environ["MLX_DISTILL_HOME"] = _SESSION_HOME
    os.environ["HF_HUB_OFFLINE"] = "1"
    os.environ["TOKENIZERS_PARALLELISM"] = "false"


def pytest_unconfigure(config: pytest.Config) -> None:
    if not os.environ.get("MLX_DISTILL_TEST_HOME"):
        shutil.rmtree(_SESSION_HOME, ignore_errors=True)


@pytest.fixture(autouse=True)
def isolated_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """HOME, XDG and HF caches in tmp; no secrets; hub offline; shared model cache."""
    fake_home = tmp_path / "home"
    fake_home.mkdir()
    monkeypatch.setenv("HOME", str(fake_home))
    monkeypatch.setenv("XDG_CACHE_HOME", str(fake_home / ".cache"))
    monkeypatch.setenv("HF_HOME", str(fake_home / ".cache" / "huggingface"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("MLX_DISTILL_HOME", _SESSION_HOME)
    monkeypatch.setenv("MPLBACKEND", "Agg")
    for var in SECRET_VARS:
        monkeypatch.delenv(var, raising=False)
    return fake_home


@pytest.fixture(scope="session")
def demo_model_dir() -> Path:
    """The fp32 embedded SmolLM2 model directory (built once per session)."""
    os.environ["MLX_DISTILL_HOME"] = _SESSION_HOME
    from mlx_distill.models import demo_model_dir as build

    return build("float32")


@pytest.fixture(scope="session")
def tiny_model_dir(demo_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 2-layer random llama with the demo tokenizer: real mlx-lm dir, trains in ms."""
    from tests.helpers import write_tiny_llama

    return write_tiny_llama(tmp_path_factory.mktemp("tiny") / "model", demo_model_dir)
