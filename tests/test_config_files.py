"""Config precedence (CLI > YAML > defaults) and the crash-safe file helpers."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import click
import pytest
from click.testing import CliRunner

from mlx_distill.config import click_options, opt, resolve, save_config
from mlx_distill.errors import ConfigError, DataError
from mlx_distill.files import JsonlAppender, read_jsonl, repair_torn_tail, write_text_atomic


@dataclass
class Demo:
    epochs: int = opt(5, "Passes over the data.")
    learning_rate: float = opt(1e-4, "Adam step size.")
    mask_prompt: bool = opt(True, "Loss on answers only.")
    name: str | None = opt(None, "Optional name.")
    kind: str = opt("lora", "Adapter kind.", choices=("lora", "dora", "full"))


def test_precedence_cli_over_yaml_over_defaults(tmp_path: Path) -> None:
    y = tmp_path / "c.yaml"
    y.write_text("epochs: 3\nlearning-rate: 2e-4\nmask_prompt: false\n")
    assert resolve(Demo) == Demo()
    cfg = resolve(Demo, {"epochs": 7, "learning_rate": None}, y)
    assert (cfg.epochs, cfg.learning_rate, cfg.mask_prompt) == (7, 2e-4, False)


def test_yaml_sections_and_errors(tmp_path: Path) -> None:
    y = tmp_path / "run.yaml"
    y.write_text("train:\n  epochs: 2\ncollect:\n  concurrency: 8\n")
    assert resolve(Demo, {}, y, section="train").epochs == 2
    y.write_text("epochs: five\n")
    with pytest.raises(ConfigError, match="'epochs' expects int, got 'five'"):
        resolve(Demo, {}, y)
    y.write_text("epoch: 5\n")
    with pytest.raises(ConfigError, match="unknown option 'epoch'.*epochs"):
        resolve(Demo, {}, y)
    y.write_text("epochs: [1,\n  2\n bad: :\n")
    with pytest.raises(ConfigError, match=r"run.yaml:\d+: invalid YAML"):
        resolve(Demo, {}, y)
    with pytest.raises(ConfigError, match="no such file"):
        resolve(Demo, {}, tmp_path / "missing.yaml")


def test_click_options_generated_from_dataclass() -> None:
    @click.command()
    @click_options(Demo)
    def cmd(**kw: object) -> None:
        click.echo(json.dumps(resolve(Demo, kw).__dict__))

    r = CliRunner().invoke(cmd, ["--epochs", "2", "--no-mask-prompt", "--kind", "dora"])
    assert r.exit_code == 0, r.output
    assert json.loads(r.output) == {"epochs": 2, "learning_rate": 1e-4, "mask_prompt": False, "name": None, "kind": "dora"}
    assert CliRunner().invoke(cmd, ["--kind", "bad"]).exit_code == 2
    assert "Passes over the data" in CliRunner().invoke(cmd, ["--help"]).output


def test_save_config_round_trip(tmp_path: Path) -> None:
    p = save_config(Demo(epochs=4), tmp_path / "sub" / "cfg.json")
    assert json.loads(p.read_text())["epochs"] == 4


def test_read_jsonl_errors_name_file_and_line(tmp_path: Path) -> None:
    p = tmp_path / "d.jsonl"
    p.write_text('{"a": 1}\n\n{"a": 2\n')
    with pytest.raises(DataError, match=r"d.jsonl:3: invalid JSON"):
        read_jsonl(p)
    p.write_bytes(b'{"a": 1}\n{"a": "\xff"}\n')
    with pytest.raises(DataError, match=r"d.jsonl:2: not valid UTF-8"):
        read_jsonl(p)
    p.write_text('[1, 2]\n')
    with pytest.raises(DataError, match=r"d.jsonl:1: expected a JSON object"):
        read_jsonl(p)


def test_torn_tail_is_repaired_and_appends_continue(tmp_path: Path) -> None:
    p = tmp_path / "out.jsonl"
    p.write_text('{"i": 0}\n{"i": 1}\n{"i": 2, "resp')
    with JsonlAppender(p) as app:
        assert app.repaired_bytes == len('{"i": 2, "resp')
        app.append({"i": 2})
    assert [r["i"] for r in read_jsonl(p)] == [0, 1, 2]
    assert repair_torn_tail(p) == 0
    q = tmp_path / "all-torn.jsonl"
    q.write_text('{"no newline at all"')
    assert repair_torn_tail(q) > 0 and q.read_text() == ""


def test_atomic_write_leaves_no_temp_files(tmp_path: Path) -> None:
    d = tmp_path / "w"
    write_text_atomic(d / "a.txt", "x")
    write_text_atomic(d / "a.txt", "y")
    assert [f.name for f in d.iterdir()] == ["a.txt"] and (d / "a.txt").read_text() == "y"
