"""Charts come from the run's artifacts: files exist, are not blank, and follow the data."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from mlx_distill import visuals
from mlx_distill.cli import main
from mlx_distill.runs import RunDir

DIMS = ("correctness", "structure", "documentation", "error_handling", "completeness")


def _scores(base: float, dist: float) -> dict:
    def cell(v: float, outcome: str) -> dict:
        return {"scores": dict.fromkeys(DIMS, v), "average": v, "execution": {"outcome": outcome}}

    return {
        "scorecard_source": "metrics",
        "averages": {
            "teacher": {**dict.fromkeys(DIMS, 8.0), "average": 8.0},
            "base": {**dict.fromkeys(DIMS, base), "average": base},
            "distilled": {**dict.fromkeys(DIMS, dist), "average": dist},
        },
        "prompts": [
            {"id": "heldout-1", "models": {"base": cell(base, "fail"), "distilled": cell(dist, "pass")}},
            {"id": "heldout-2", "models": {"base": cell(base, "pass"), "distilled": cell(dist, "timeout")}},
        ],
    }


def make_run(root: Path) -> RunDir:
    run = RunDir(root)
    root.mkdir(parents=True, exist_ok=True)
    rows = []
    for step in range(1, 21):
        rows.append({"type": "train", "step": step, "epoch": step / 10, "loss": 2.0 - step * 0.05,
                     "acc": 0.5 + step * 0.01, "lr": 1e-4, "tokens": 100, "tok_per_s": 50.0,
                     "peak_mem_gb": 1.0, "time_s": step * 2.0})
        if step % 10 == 0:
            rows.append({"type": "val", "step": step, "epoch": step / 10, "loss": 2.1 - step * 0.04, "acc": 0.5})
    run.metrics.write_text("".join(json.dumps(r) + "\n" for r in rows))
    run.scores.write_text(json.dumps(_scores(4.2, 7.0)))
    td = [{"id": f"p{i}", "model": "claude-sonnet-4-6", "cost_usd": 0.015,
           "usage": {"input_tokens": 80, "output_tokens": 1000 + i, "cache_creation_input_tokens": 0,
                     "cache_read_input_tokens": 0}} for i in range(5)]
    run.teacher_data.write_text("".join(json.dumps(r) + "\n" for r in td))
    return run


def _not_blank(path: Path) -> None:
    import matplotlib.image as mpimg

    img = mpimg.imread(path)
    assert img.shape[0] > 100 and img.shape[1] > 100
    assert float(np.std(img[..., :3])) > 0.02, f"{path.name} looks blank"


def test_all_charts_exist_and_are_not_blank(tmp_path: Path) -> None:
    run = make_run(tmp_path / "run")
    result = CliRunner().invoke(main, ["visuals", str(run.root)])
    assert result.exit_code == 0, result.output
    for name in ("training_curves", "model_scorecard", "prompt_comparison", "cost_scaling"):
        _not_blank(run.visuals / f"{name}.png")
    mmd = (run.visuals / "pipeline.mmd").read_text()
    assert mmd.startswith("flowchart LR") and "5 Coding" in mmd and "$0.07" in mmd and "claude-sonnet-4-6" in mmd


def test_charts_follow_the_metrics(tmp_path: Path) -> None:
    run = make_run(tmp_path / "run")
    before = visuals.draw_training_curves(visuals.read_jsonl(run.metrics), run.visuals / "a.png")
    rows = visuals.read_jsonl(run.metrics)
    rows[0]["loss"] = 9.5
    run.metrics.write_text("".join(json.dumps(r) + "\n" for r in rows))
    after = visuals.draw_training_curves(visuals.read_jsonl(run.metrics), run.visuals / "b.png")
    assert before["train_loss"][0] == 1.95 and after["train_loss"][0] == 9.5
    assert (run.visuals / "a.png").read_bytes() != (run.visuals / "b.png").read_bytes()
    assert [e for e, _ in after["epochs"]] == [1, 2]


def test_kd_runs_plot_ce_and_kl_separately(tmp_path: Path) -> None:
    run = make_run(tmp_path / "run")
    rows = visuals.read_jsonl(run.metrics)
    plain = visuals.draw_training_curves(rows, run.visuals / "sft.png")
    assert "train_kl" not in plain and "train_ce" not in plain
    for k, r in enumerate(x for x in rows if x.get("type") == "train"):
        r["ce"], r["kl"] = r["loss"] * 0.8, 0.1 + 0.01 * k
    kd = visuals.draw_training_curves(rows, run.visuals / "kd.png")
    train = [r for r in rows if r.get("type") == "train"]
    assert kd["train_kl"] == [r["kl"] for r in train] and kd["train_ce"] == [r["ce"] for r in train]
    _not_blank(run.visuals / "kd.png")
    assert (run.visuals / "kd.png").read_bytes() != (run.visuals / "sft.png").read_bytes()


def test_scorecard_follows_scores_and_says_when_no_judge(tmp_path: Path) -> None:
    d1 = visuals.draw_scorecard(_scores(4.2, 7.0), tmp_path / "s1.png")
    d2 = visuals.draw_scorecard(_scores(3.0, 5.5), tmp_path / "s2.png")
    assert d1["averages"]["distilled"] == 7.0 and d2["averages"]["distilled"] == 5.5
    assert d1["source"] == "metrics"
    p = visuals.draw_prompt_comparison(_scores(4.2, 7.0), tmp_path / "p.png")
    assert p["outcomes"][0] == {"base": "fail", "distilled": "pass"}


def test_cost_scaling_uses_measured_tokens(tmp_path: Path) -> None:
    run = make_run(tmp_path / "run")
    d = visuals.draw_cost_scaling(visuals.read_jsonl(run.teacher_data), tmp_path / "c.png")
    assert [r["prompts"] for r in d["rows"]] == [104, 10_000, 1_000_000, 16_000_000]
    per_prompt = (80 * 3 + 1002 * 15) / 1e6
    assert d["rows"][0]["sync_usd"] == pytest.approx(104 * per_prompt)
    assert d["rows"][0]["batch_usd"] == pytest.approx(52 * per_prompt)


def test_missing_artifacts_are_reported_not_crashing(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    result = CliRunner().invoke(main, ["visuals", str(tmp_path / "empty")])
    assert result.exit_code == 0
    assert "no metrics.jsonl yet" in result.output and (tmp_path / "empty" / "visuals" / "pipeline.mmd").exists()
    bad = CliRunner().invoke(main, ["visuals", str(tmp_path / "nope")])
    assert bad.exit_code == 2 and "no such run folder" in bad.output
