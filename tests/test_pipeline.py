"""`mlx-distill run`: every stage for real on tiny models; skip, change, force, resume, no key."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from mlx_distill import pipeline
from mlx_distill.cli import main
from mlx_distill.runs import RunDir

REPO = Path(__file__).resolve().parent.parent


def write_config(path: Path, student: Path, **extra: object) -> Path:
    """A run config on the tiny random llama: teacher and student, seconds per stage."""
    cfg = {
        "student": str(student),
        "teacher": f"local:{student}",
        "judge": "none",
        "prompts": [str(REPO / "prompts" / "base.jsonl")],
        "heldout": str(REPO / "prompts" / "heldout.jsonl"),
        "limit": 6,
        "collect": {"max_tokens": 12, "system": "Answer in Python."},
        "prepare": {"keep_truncated": True, "valid_fraction": 0.2},
        "train": {"iters": 2, "batch_size": 2, "max_seq_length": 256},
        "generate": {"max_tokens": 8},
        "export": {"verify": True},
    }
    for key, value in extra.items():
        if isinstance(value, dict):
            cfg.setdefault(key, {}).update(value)
        else:
            cfg[key] = value
    import yaml

    path.write_text(yaml.safe_dump(cfg))
    return path


def run(config: Path, out: Path, *args: str) -> tuple[int, str]:
    result = CliRunner().invoke(main, ["run", "--config", str(config), "--out", str(out), *args])
    if result.exception and not isinstance(result.exception, SystemExit):
        raise result.exception
    return result.exit_code, result.output


def stage_lines(output: str) -> dict[str, str]:
    out = {}
    for line in output.splitlines():
        if line.startswith("[") and "] " in line and "/" not in line.split("]")[0]:
            name, _, rest = line[1:].partition("] ")
            out.setdefault(name, rest)
    return out


@pytest.fixture(scope="module")
def tiny_student(tiny_model_dir: Path) -> Path:
    return tiny_model_dir


def test_full_run_then_rerun_skips_then_change_reruns_downstream(tiny_student: Path, tmp_path: Path) -> None:
    cfg = write_config(tmp_path / "run.yaml", tiny_student)
    out = tmp_path / "run"
    code, output = run(cfg, out)
    assert code == 0, output
    r = RunDir(out)
    for p in (r.prompts, r.heldout, r.teacher_data, r.data / "train.jsonl", r.adapters / "adapters.safetensors",
              r.metrics, r.generation("teacher"), r.generation("base"), r.generation("distilled"), r.scores,
              r.report, r.visuals / "training_curves.png", r.visuals / "pipeline.mmd", r.export / "config.json"):
        assert p.exists(), p
    for stage in pipeline.STAGES:
        assert r.stage_config(stage).exists(), stage
    assert len(r.teacher_data.read_text().splitlines()) == 6
    held = {json.loads(line)["id"] for line in r.heldout.read_text().splitlines()}
    trained = {json.loads(line)["id"] for line in (r.data / "train.jsonl").read_text().splitlines()}
    assert not held & trained
    assert json.loads((r.export / "verify.json").read_text())
    assert "Everything is in" in output

    # Rerun: nothing to do.
    code, output = run(cfg, out)
    assert code == 0
    assert set(stage_lines(output).values()) == {"up to date, skipped"}

    # Change the training config: train and what follows run again; earlier stages do not;
    # the replaced adapter is kept in history/.
    old_adapter = (r.adapters / "adapters.safetensors").read_bytes()
    write_config(cfg, tiny_student, train={"iters": 3})
    code, output = run(cfg, out)
    assert code == 0, output
    lines = stage_lines(output)
    assert lines["prompts"] == lines["collect"] == lines["prepare"] == "up to date, skipped"
    assert lines["train"] == "inputs or config changed"
    assert lines["generate"] == "inputs or config changed"
    kept = list((out / "history").glob("*/adapters/adapters.safetensors"))
    assert kept and kept[0].read_bytes() == old_adapter
    # The teacher's answers (paid, for a Claude teacher) were not moved.
    assert len(r.teacher_data.read_text().splitlines()) == 6

    # --force a stage.
    code, output = run(cfg, out, "--force", "compare")
    assert stage_lines(output)["compare"] == "forced" and stage_lines(output)["train"] == "up to date, skipped"


def test_interrupted_run_resumes_at_the_stage_it_stopped_in(
    tiny_student: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cfg = write_config(tmp_path / "run.yaml", tiny_student, export=False)
    out = tmp_path / "run"
    import mlx_distill.compare as compare

    real = compare.compare_run

    def crash(*a: object, **k: object) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(compare, "compare_run", crash)
    code, output = run(cfg, out)
    assert code != 0 and "interrupted" in output
    state = json.loads(RunDir(out).state.read_text())["stages"]
    assert state["compare"]["status"] == "running" and state["train"]["status"] == "done"
    monkeypatch.setattr(compare, "compare_run", real)
    code, output = run(cfg, out)
    assert code == 0, output
    lines = stage_lines(output)
    assert lines["train"] == "up to date, skipped" and lines["compare"] == "resuming"
    assert "export" not in lines


def test_no_key_says_which_stages_need_one_and_spends_nothing(tiny_student: Path, tmp_path: Path) -> None:
    cfg = write_config(tmp_path / "run.yaml", tiny_student, teacher="anthropic:claude-sonnet-4-6",
                       judge="anthropic:claude-opus-4-6")
    code, output = run(cfg, tmp_path / "run")
    assert code == 2
    for stage in ("collect", "generate", "compare"):
        assert stage in output
    assert "ANTHROPIC_API_KEY" in output and "Nothing was sent" in output
    assert not (tmp_path / "run").exists()


def test_bad_run_config_fails_before_any_stage(tiny_student: Path, tmp_path: Path) -> None:
    cfg = write_config(tmp_path / "run.yaml", tiny_student, train={"epoch": 3})
    code, output = run(cfg, tmp_path / "run")
    assert code == 2 and "unknown option 'epoch'" in output and not (tmp_path / "run").exists()
    cfg = write_config(tmp_path / "run2.yaml", tiny_student, prompts=["nope.jsonl"])
    code, output = run(cfg, tmp_path / "run2")
    assert code == 2 and "nope.jsonl: no such file" in output
    code, output = run(write_config(tmp_path / "r3.yaml", tiny_student), tmp_path / "r3", "--force", "trian")
    assert code == 2 and "unknown stage" in output


def test_demo_and_reference_configs_are_valid() -> None:
    demo = pipeline.load_run_config(REPO / "configs" / "demo.yaml")
    assert demo.student == demo.teacher == "demo" and demo.judge == "none"
    ref = pipeline.load_run_config(REPO / "configs" / "claude-to-qwen1.5b.yaml")
    assert ref.student == "Qwen/Qwen2.5-1.5B-Instruct" and ref.teacher == "anthropic:claude-sonnet-4-6"
    assert ref.judge.startswith("anthropic:claude-opus") and ref.sections["train"]["epochs"] == 5
    assert len(ref.prompts) == 2 and ref.limit is None  # all 32 + 72 prompts


def test_spread_keeps_a_subset_varied() -> None:
    from mlx_distill.prompts import Prompt

    rows = [Prompt(id=f"{c}{i}", prompt="x", category=c) for c in "abc" for i in range(4)]
    picked = pipeline.spread(rows, 6)
    assert [p.category for p in picked] == ["a", "b", "c", "a", "b", "c"]
