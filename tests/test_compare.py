"""``compare``: a fixture run folder (teacher good, base mediocre, distilled broken) -> scores.json + report.

The judge is injected as ``judge_fn`` returning a canned result in the judge
module's contract shape (test data, not a mock of the SDK); one slow test runs
the real judge through the real SDK against the loopback fake API.
"""

from __future__ import annotations

import base64
import json
import shutil
from pathlib import Path

import pytest
from click.testing import CliRunner

from mlx_distill.compare import CompareConfig, cli, compare_run
from mlx_distill.errors import ConfigError, DataError
from mlx_distill.rubric import DIMENSION_KEYS
from mlx_distill.runs import RunDir
from tests.test_execution_heldout import CASES, HELDOUT

IDS = list(CASES)
BROKEN = {  # what a tiny student really produces: cut off, off-topic, incomplete SQL, wrong name
    "heldout-balanced-tree": "```python\ndef is_balanced(root):\n    if root is None:\n        return True\n    lh = ",
    "heldout-connection-pool": "A connection pool keeps connections open so they can be reused.",
    "heldout-sql-above-average": "```sql\nSELECT name FROM employees WHERE salary > (SELECT AVG(salary",
    "heldout-ttl-cache": "```python\nimport os\nKEY = os.environ.get('ANTHROPIC_API_KEY')\n\ndef cache(f):\n    return f\n```",
}
FAST = {"timeout_s": 10.0, "jobs": 2}


def write_run(root: Path, answers: dict[str, dict[str, str]] | None = None) -> RunDir:
    """A run folder as the pipeline leaves it before compare."""
    rd = RunDir(root)
    rd.generations.mkdir(parents=True, exist_ok=True)
    shutil.copy(HELDOUT, rd.heldout)
    answers = answers or {
        "teacher": {i: CASES[i][0] for i in IDS},
        "base": {i: CASES[i][1] for i in IDS},
        "distilled": dict(BROKEN),
    }
    for model, by_id in answers.items():
        stop = "length" if model == "distilled" else "eos"
        rows = [
            {
                "id": i,
                "prompt": "…",
                "response": text,
                "stop_reason": stop,
                "completion_tokens": 120,
                "prompt_tokens": 80,
            }
            for i, text in by_id.items()
        ]
        rd.generation(model).write_text("".join(json.dumps(r) + "\n" for r in rows))
    metrics = [{"type": "val", "step": 0, "epoch": 0.0, "loss": 0.95, "acc": 0.77}]
    metrics += [
        {
            "type": "train",
            "step": s,
            "epoch": s / 4,
            "loss": round(0.9 - 0.02 * s, 3),
            "acc": round(0.781 + 0.003 * s, 3),
            "lr": 1e-4,
            "tokens": 900,
            "tok_per_s": 60.0,
        }
        for s in range(1, 6)
    ]
    metrics += [{"type": "val", "step": 4, "epoch": 1.0, "loss": 0.81, "acc": 0.822}]
    rd.metrics.write_text("".join(json.dumps(m) + "\n" for m in metrics))
    rd.teacher_data.write_text(
        "".join(
            json.dumps(
                {
                    "id": f"p{i}",
                    "response": "x" * 100,
                    "model": "claude-sonnet-4-6",
                    "cost_usd": 0.015,
                }
            )
            + "\n"
            for i in range(4)
        )
    )
    return rd


def canned_judge(miss: tuple[str, str] | None = None, bad_score: tuple[str, str] | None = None):
    """A judge_fn returning the judge contract's shape, recording its calls."""
    calls: list[list[str]] = []
    level = {"teacher": 9.0, "base": 4.0, "distilled": 7.0}

    def fn(items: list, cfg: object) -> dict:
        calls.append([i.id for i in items])
        prompts = {}
        for it in items:
            single = {}
            for m in it.answers:
                if (it.id, m) == miss:
                    continue
                scores = {
                    d: level[m] + (0.5 if d == "documentation" else 0.0) for d in DIMENSION_KEYS
                }
                if (it.id, m) == bad_score:
                    scores["correctness"] = 11  # out of range: must count as a miss
                single[m] = {
                    "scores": scores,
                    "std": {d: 0.0 for d in DIMENSION_KEYS},
                    "rationale": f"<b>{m}</b> rationale for {it.id}",
                    "n": 1,
                }
            pair = {
                "winner": "distilled",
                "flipped": False,
                "votes": [
                    {"order": ["distilled", "base"], "winner": "distilled", "rationale": "clearer"},
                    {"order": ["base", "distilled"], "winner": "distilled", "rationale": "safer"},
                ],
            }
            if it.id == "heldout-sql-above-average":
                pair = {"winner": "tie", "flipped": True, "votes": []}
            prompts[it.id] = {"single": single, "pairwise": pair}
        return {
            "judge_model": "claude-opus-4-6",
            "repeats": 1,
            "calls": 12 * len(items) // 4,
            "misses": 0,
            "usage": {},
            "cost_usd": 0.42,
            "bias_note": "Claude may prefer Claude-like answers.",
            "prompts": prompts,
        }

    fn.calls = calls  # type: ignore[attr-defined]
    return fn


@pytest.fixture(scope="module")
def metrics_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[RunDir, dict, list[str]]:
    rd = write_run(tmp_path_factory.mktemp("run") / "run")
    notices: list[str] = []
    scores = compare_run(rd.root, CompareConfig(judge="none", **FAST), echo=notices.append)
    return rd, scores, notices


def test_metrics_scorecard_without_a_judge(metrics_run: tuple[RunDir, dict, list[str]]) -> None:
    rd, scores, notices = metrics_run
    assert json.loads(rd.scores.read_text()) == scores
    assert rd.report.is_file() and rd.stage_config("compare").is_file()
    assert scores["scorecard_source"] == "metrics" and scores["judge"]["used"] is False
    assert [n for n in notices if "judge" in n] == [
        "judge disabled with --judge none; the scorecard comes from execution and style metrics"
    ]
    assert scores["models"] == ["teacher", "base", "distilled"]
    ex = scores["execution_summary"]
    assert (ex["teacher"]["pass"], ex["base"]["fail"], ex["distilled"]["pass"]) == (4, 4, 0)
    assert ex["teacher"]["tests_passed"] == ex["teacher"]["tests_total"] == 23
    by_id = {p["id"]: p for p in scores["prompts"]}
    tree = by_id["heldout-balanced-tree"]["models"]
    cut = tree["distilled"]
    # the cut-off block runs up to its last complete line: only the empty-tree test passes
    assert (cut["execution"]["outcome"], cut["execution"]["passed"]) == ("fail", 1)
    assert "cut off" in cut["execution"]["extraction"]["reason"] and cut["style"]["text"]["cut_off"]
    assert cut["style"]["code"]["parses"] is False  # style sees the block as written
    assert (
        tree["base"]["execution"]["passed"] == 7
        and tree["base"]["scores"] == tree["base"]["metric_scores"]
    )
    ttl = by_id["heldout-ttl-cache"]["models"]["distilled"]["execution"]
    assert ttl["outcome"] == "error" and "no Python block defines 'ttl_cache'" in ttl["message"]
    sql = by_id["heldout-sql-above-average"]["models"]["teacher"]
    assert sql["scores"]["error_handling"] is None  # not measurable for SQL: left out, not zero


def test_averages_and_improvement_follow_the_reference_table(
    metrics_run: tuple[RunDir, dict, list[str]],
) -> None:
    _, scores, _ = metrics_run
    avg, imp = scores["averages"], scores["improvement"]
    for m in scores["models"]:
        for d in DIMENSION_KEYS:
            vals = [
                p["models"][m]["scores"][d]
                for p in scores["prompts"]
                if p["models"][m]["scores"][d] is not None
            ]
            assert avg[m][d] == pytest.approx(sum(vals) / len(vals), abs=0.01)
        dims = [avg[m][d] for d in DIMENSION_KEYS]
        assert avg[m]["average"] == pytest.approx(
            sum(dims) / 5, abs=0.01
        )  # like 9.1 = mean of 9.5, 9.5, 9, 9, 8.5
    for d in (*DIMENSION_KEYS, "average"):
        assert imp[d] == pytest.approx(avg["distilled"][d] - avg["base"][d], abs=0.011)
    assert avg["teacher"]["average"] > avg["base"]["average"] > avg["distilled"]["average"]


def test_training_and_data_summaries(metrics_run: tuple[RunDir, dict, list[str]]) -> None:
    _, scores, _ = metrics_run
    tr = scores["training"]
    assert tr["first"] == {"step": 1, "epoch": 0.25, "loss": 0.88, "acc": 0.784}
    assert tr["last"] == {"step": 5, "epoch": 1.25, "loss": 0.8, "acc": 0.796}
    assert tr["best_acc"] == {"acc": 0.822, "epoch": 1.0, "step": 4, "split": "val"}
    assert (tr["train_records"], tr["val_records"]) == (5, 2)
    assert scores["data"] == {
        "examples": 4,
        "mean_response_chars": 100.0,
        "cost_usd": 0.06,
        "teacher_models": ["claude-sonnet-4-6"],
    }


def test_no_key_skips_the_real_judge_with_one_notice(tmp_path: Path) -> None:
    rd = write_run(
        tmp_path / "run",
        {"teacher": {IDS[2]: CASES[IDS[2]][0]}, "base": {IDS[2]: CASES[IDS[2]][1]}},
    )
    notices: list[str] = []
    scores = compare_run(rd.root, CompareConfig(report=False, **FAST), echo=notices.append)
    judge_lines = [n for n in notices if "judge" in n.lower()]
    assert len(judge_lines) == 1 and "ANTHROPIC_API_KEY" in judge_lines[0]
    assert (
        scores["scorecard_source"] == "metrics" and "ANTHROPIC_API_KEY" in scores["judge"]["notice"]
    )
    assert scores["models"] == ["teacher", "base"] and scores["improvement"] is None
    missing = {p["id"]: p["models"]["teacher"]["available"] for p in scores["prompts"]}
    assert missing == {i: i == IDS[2] for i in IDS}
    assert scores["execution_summary"]["teacher"]["missing"] == 3


def test_judge_result_lands_in_scores_with_misses_handled(tmp_path: Path) -> None:
    rd = write_run(tmp_path / "run")
    judge = canned_judge(
        miss=("heldout-ttl-cache", "distilled"), bad_score=("heldout-balanced-tree", "distilled")
    )
    scores = compare_run(rd.root, CompareConfig(**FAST), judge_fn=judge)
    assert len(judge.calls) == 1 and sorted(judge.calls[0]) == sorted(IDS)
    assert scores["scorecard_source"] == "judge"
    j = scores["judge"]
    assert (j["used"], j["model"], j["cost_usd"], j["calls"]) == (True, "claude-opus-4-6", 0.42, 12)
    by_id = {p["id"]: p for p in scores["prompts"]}
    base = by_id["heldout-connection-pool"]["models"]["base"]
    assert base["scores"]["correctness"] == 4.0 and base["judge"]["rationale"].startswith(
        "<b>base</b>"
    )
    assert base["metric_scores"]["correctness"] == pytest.approx(3.3)  # execution still recorded
    for pid in ("heldout-ttl-cache", "heldout-balanced-tree"):  # a miss and an out-of-range score
        cell = by_id[pid]["models"]["distilled"]
        assert cell["judge"] is None and cell["scores"] is None and cell["average"] is None
    avg = scores["averages"]
    assert avg["distilled"]["n"] == 2 and avg["base"]["n"] == 4
    assert avg["distilled"]["correctness"] == 7.0 and avg["distilled"]["documentation"] == 7.5
    assert scores["improvement"]["correctness"] == 3.0 and scores["improvement"]["average"] == 3.0
    assert scores["judge_averages"] == avg and scores["metric_averages"]["base"]["n"] == 4
    assert scores["pairwise_summary"] == {
        "distilled": 3,
        "base": 0,
        "tie": 1,
        "flipped": 1,
        "missing": 0,
    }
    html = rd.report.read_text()
    assert "&lt;b&gt;base&lt;/b&gt; rationale" in html and "<b>base</b> rationale" not in html
    assert "Claude may prefer Claude-like answers." in html and "judge miss" in html


def test_rerun_reuses_paid_judge_results_and_keeps_old_ones(tmp_path: Path) -> None:
    rd = write_run(tmp_path / "run")
    first = canned_judge()
    compare_run(rd.root, CompareConfig(report=False, **FAST), judge_fn=first)
    assert len(first.calls) == 1

    def must_not_call(items: list, cfg: object) -> dict:
        raise AssertionError("the judge was called again for identical answers")

    notes: list[str] = []
    again = compare_run(
        rd.root, CompareConfig(report=False, **FAST), judge_fn=must_not_call, echo=notes.append
    )
    assert again["judge"]["used"] and any("reusing" in n for n in notes)
    assert list(rd.root.glob("scores.*.json")) == []

    rows = [json.loads(x) for x in rd.generation("distilled").read_text().splitlines()]
    rows[0]["response"] = CASES[IDS[0]][0]  # a new distilled answer: the old grades no longer apply
    rd.generation("distilled").write_text("".join(json.dumps(r) + "\n" for r in rows))
    second = canned_judge()
    compare_run(rd.root, CompareConfig(report=False, **FAST), judge_fn=second)
    assert len(second.calls) == 1
    kept = list(rd.root.glob("scores.*.json"))
    assert len(kept) == 1 and json.loads(kept[0].read_text())["judge"]["cost_usd"] == 0.42


def _bad(rd: RunDir, model: str, text: str) -> None:
    rd.generation(model).write_text(text)


@pytest.mark.parametrize(
    "setup, err, needle",
    [
        (lambda rd: rd.heldout.unlink(), ConfigError, "--heldout"),
        (lambda rd: shutil.rmtree(rd.generations), ConfigError, "no generations found"),
        (
            lambda rd: _bad(rd, "base", '{"id": "heldout-ttl-cache", "response": "x"}\n{oops\n'),
            DataError,
            "base.jsonl:2:",
        ),
        (
            lambda rd: _bad(rd, "base", '{"id": "heldout-ttl-cache"}\n'),
            DataError,
            "base.jsonl:1: a generation record needs",
        ),
        (
            lambda rd: _bad(
                rd, "base", '{"id": "a", "response": ""}\n{"id": "a", "response": ""}\n'
            ),
            DataError,
            "duplicate id 'a' (first on line 1)",
        ),
        (
            lambda rd: rd.heldout.write_text(
                '{"id": "x", "prompt": "p", "tests": {"kind": "java"}}\n'
            ),
            DataError,
            "heldout.jsonl:1: unknown tests kind",
        ),
    ],
)
def test_bad_inputs_fail_before_any_work(tmp_path: Path, setup, err, needle: str) -> None:
    rd = write_run(tmp_path / "run")
    setup(rd)
    with pytest.raises(err) as e:
        compare_run(rd.root, CompareConfig(judge="none", **FAST))
    assert needle in str(e.value)
    assert not rd.scores.exists() and not rd.report.exists()


def test_cli_prints_the_table_and_exits_2_on_bad_flags(tmp_path: Path) -> None:
    rd = write_run(
        tmp_path / "run",
        {"teacher": {IDS[2]: CASES[IDS[2]][0]}, "base": {IDS[2]: CASES[IDS[2]][1]}},
    )
    res = CliRunner().invoke(cli, ["--run", str(rd.root), "--judge", "none", "--timeout-s", "10"])
    assert res.exit_code == 0, res.output
    assert (
        str(rd.scores) in res.stdout
        and "Code Correctness" in res.stderr
        and "teacher 2/2" in res.stderr
    )
    bad = CliRunner().invoke(cli, ["--run", str(rd.root), "--judge", "gpt-4o"])
    assert bad.exit_code == 2 and "expected anthropic:MODEL" in bad.output
    missing = CliRunner().invoke(cli, ["--judge", "none"])
    assert missing.exit_code == 2 and "--run DIR is required" in missing.output


@pytest.mark.slow
def test_real_judge_through_the_sdk_and_the_key_is_never_written(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from tests.fake_anthropic import TEST_KEY, FakeAnthropic, user_text

    def responder(body: dict) -> str:
        if "<answer_a>" in user_text(body):
            return json.dumps({"winner": "A", "rationale": "A is more complete."})
        return json.dumps(
            {"scores": {d: 6.5 for d in DIMENSION_KEYS}, "rationale": "Solid, minor gaps."}
        )

    rd = write_run(
        tmp_path / "run",
        {m: {IDS[2]: CASES[IDS[2]][k]} for m, k in (("teacher", 0), ("base", 1), ("distilled", 0))},
    )
    with FakeAnthropic(responder=responder) as fake:
        monkeypatch.setenv("ANTHROPIC_API_KEY", TEST_KEY)
        monkeypatch.setenv("ANTHROPIC_BASE_URL", fake.base_url)
        scores = compare_run(
            rd.root, CompareConfig(judge="anthropic:claude-opus-4-6", **FAST), echo=lambda s: None
        )
    assert scores["scorecard_source"] == "judge" and scores["judge"]["calls"] >= 5
    cell = scores["prompts"][2]["models"]["base"]
    assert (
        cell["scores"]["correctness"] == 6.5 and cell["judge"]["rationale"] == "Solid, minor gaps."
    )
    assert scores["prompts"][2]["pairwise"]["winner"] in ("base", "distilled", "tie")
    for f in [p for p in rd.root.rglob("*") if p.is_file()]:
        assert TEST_KEY not in f.read_text(errors="replace"), f


def test_a_bad_judge_spec_fails_before_any_work(tmp_path: Path) -> None:
    rd = write_run(tmp_path / "run")
    with pytest.raises(ConfigError, match="expected anthropic:MODEL"):
        compare_run(rd.root, CompareConfig(judge="openai:gpt-4o", **FAST))
    assert not rd.scores.exists() and not rd.stage_config("compare").exists()


def test_judge_that_grades_nothing_falls_back_to_metrics_with_a_notice(tmp_path: Path) -> None:
    rd = write_run(
        tmp_path / "run",
        {"teacher": {IDS[2]: CASES[IDS[2]][0]}, "base": {IDS[2]: CASES[IDS[2]][1]}},
    )

    def all_misses(items: list, cfg: object) -> dict:
        return {
            "judge_model": "claude-opus-4-6",
            "calls": 6,
            "misses": 6,
            "cost_usd": 0.1,
            "prompts": {i.id: {"single": {}, "pairwise": None} for i in items},
        }

    notes: list[str] = []
    scores = compare_run(rd.root, CompareConfig(**FAST), judge_fn=all_misses, echo=notes.append)
    assert scores["scorecard_source"] == "metrics" and scores["judge"]["used"]
    assert "no valid grade (6 misses)" in scores["judge"]["notice"]
    assert any("no valid grade" in n for n in notes)
    assert scores["averages"] == scores["metric_averages"]
    assert "no valid grade" in rd.report.read_text()


def test_report_only_rerenders_with_charts_drawn_after_compare(tmp_path: Path) -> None:
    rd = write_run(
        tmp_path / "run",
        {"teacher": {IDS[2]: CASES[IDS[2]][0]}, "base": {IDS[2]: CASES[IDS[2]][1]}},
    )
    runner = CliRunner()
    none = runner.invoke(cli, ["--run", str(rd.root), "--report-only"])
    assert none.exit_code == 2 and "run `mlx-distill compare --run" in none.output
    assert runner.invoke(cli, ["--run", str(rd.root), "--judge", "none"]).exit_code == 0
    scores_before = rd.scores.read_bytes()
    assert "data:image/png" not in rd.report.read_text()
    rd.visuals.mkdir()
    # a 1x1 PNG, as the visuals stage would leave charts
    rd.visuals.joinpath("model_scorecard.png").write_bytes(
        base64.b64decode(
            "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mNk+M9QDwADhgGAWjR9awAAAABJRU5ErkJggg=="
        )
    )
    res = runner.invoke(cli, ["--run", str(rd.root), "--report-only"])
    assert res.exit_code == 0 and res.stdout.strip() == str(rd.report)
    assert "data:image/png;base64,iVBOR" in rd.report.read_text()
    assert rd.scores.read_bytes() == scores_before
