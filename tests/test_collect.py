"""`mlx-distill collect` against the loopback fake API: records, resume, cost, budget, bad input."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from mlx_distill.collect import CollectConfig, cli, collect, read_records, record_key, sidecar
from mlx_distill.errors import BudgetExceeded, ConfigError, DataError
from mlx_distill.pricing import (
    USAGE_FIELDS,
    PriceTable,
    add_usage,
    load_prices,
    worst_case_cost,
    zero_usage,
)
from mlx_distill.teachers.anthropic import AnthropicTeacher
from mlx_distill.terms import TERMS_NOTICE
from tests.fake_anthropic import TEST_KEY, FakeAnthropic, Fault

MODEL = "claude-sonnet-4-6"


@pytest.fixture
def fake(monkeypatch):
    with FakeAnthropic() as f:
        monkeypatch.setenv("ANTHROPIC_API_KEY", TEST_KEY)
        monkeypatch.setenv("ANTHROPIC_BASE_URL", f.base_url)
        yield f


def write_prompts(path: Path, n: int, prefix: str = "task") -> Path:
    path.write_text(
        "".join(
            json.dumps(
                {
                    "id": f"p{i:02d}",
                    "prompt": f"{prefix} {i}: write a parser",
                    "category": "parsing",
                    "language": "python",
                    "source": "base",
                }
            )
            + "\n"
            for i in range(n)
        )
    )
    return path


def cli_run(*args: str) -> object:
    return CliRunner().invoke(cli, list(args), catch_exceptions=False)


def fast_teacher(fake: FakeAnthropic, **kw) -> AnthropicTeacher:
    return AnthropicTeacher(MODEL, api_key=TEST_KEY, base_url=fake.base_url, backoff_s=0.01, **kw)


def test_cli_collects_every_prompt_with_the_full_record(fake, tmp_path):
    prompts = write_prompts(tmp_path / "p.jsonl", 6)
    out = tmp_path / "run" / "teacher_data.jsonl"
    res = cli_run(
        "--prompts",
        str(prompts),
        "--out",
        str(out),
        "--teacher",
        f"anthropic:{MODEL}",
        "--concurrency",
        "3",
        "--max-tokens",
        "300",
        "--system",
        "Be brief.",
    )
    assert res.exit_code == 0, res.output
    assert TERMS_NOTICE in res.stderr and "6 done, 0 failed, 0 skipped" in res.stderr
    assert res.stdout.strip() == str(out)
    recs = read_records(out)
    assert sorted(r["id"] for r in recs) == [f"p{i:02d}" for i in range(6)]
    prices = PriceTable()
    for r in recs:
        for field in (
            "id",
            "key",
            "prompt",
            "system",
            "response",
            "model",
            "stop_reason",
            "usage",
            "cost_usd",
            "latency_s",
            "request_id",
            "created_at",
        ):
            assert field in r
        assert set(r["usage"]) == set(USAGE_FIELDS)
        assert r["system"] == "Be brief." and r["model"] == MODEL and r["stop_reason"] == "end_turn"
        assert r["request_id"].startswith("req_") and r["prompt"][:60] in r["response"]
        assert r["cost_usd"] == pytest.approx(prices.cost(MODEL, r["usage"]), abs=1e-12)
        assert r["key"] == record_key(
            r["prompt"], "Be brief.", f"anthropic:{MODEL}", 300, None, None
        )
    assert json.loads(sidecar(out, "config.json").read_text())["concurrency"] == 3


def test_key_ignores_concurrency_and_batching_but_not_sampling():
    k = record_key("p", "s", "anthropic:m", 100, None, None)
    assert k == record_key("p", "s", "anthropic:m", 100, None, None)
    assert k != record_key("p", "s", "anthropic:m", 100, 0.5, None)
    assert k != record_key("p", "s", "anthropic:other", 100, None, None)
    assert k != record_key("p", None, "anthropic:m", 100, None, None)


def test_rerun_resumes_without_paying_twice(fake, tmp_path):
    prompts = write_prompts(tmp_path / "p.jsonl", 5)
    out = tmp_path / "t.jsonl"
    cfg = CollectConfig(prompts=str(prompts), out=str(out), teacher=f"anthropic:{MODEL}")
    first = collect(cfg, echo=lambda s: None)
    second = collect(cfg, echo=lambda s: None)
    assert (first.done, second.done, second.skipped) == (5, 0, 5)
    assert len(read_records(out)) == 5 and fake.duplicates() == 0 and sum(fake.paid.values()) == 5


def test_torn_last_line_is_repaired_and_resumed(fake, tmp_path):
    prompts = write_prompts(tmp_path / "p.jsonl", 4)
    out = tmp_path / "t.jsonl"
    cfg = CollectConfig(prompts=str(prompts), out=str(out), teacher=f"anthropic:{MODEL}")
    collect(cfg, echo=lambda s: None)
    lines = out.read_text().splitlines(keepends=True)
    out.write_text("".join(lines[:2]) + lines[2][: len(lines[2]) // 2])  # a crash mid-write
    said: list[str] = []
    s = collect(cfg, echo=said.append)
    assert s.done == 2 and s.skipped == 2 and any("torn last line" in m for m in said)
    assert sorted(r["id"] for r in read_records(out)) == ["p00", "p01", "p02", "p03"]
    assert all(line.endswith("\n") for line in out.read_text().splitlines(keepends=True))


@pytest.mark.parametrize(
    ("flags", "names"),
    [
        (["--max-tokens", "200"], "--max-tokens"),
        (["--teacher", "anthropic:claude-haiku-4-5"], "--teacher"),
        (["--system", "Other."], "--system"),
    ],
)
def test_output_from_other_settings_is_refused(fake, tmp_path, flags, names):
    prompts = write_prompts(tmp_path / "p.jsonl", 3)
    out = tmp_path / "t.jsonl"
    base = [
        "--prompts",
        str(prompts),
        "--out",
        str(out),
        "--teacher",
        f"anthropic:{MODEL}",
        "--max-tokens",
        "100",
    ]
    assert cli_run(*base).exit_code == 0
    before = out.read_bytes()
    res = cli_run(*base, *flags)
    assert res.exit_code == 2 and names in res.stderr and "other settings" in res.stderr
    assert out.read_bytes() == before


def test_sampling_flags_are_refused_for_claude_before_sending(fake, tmp_path):
    prompts = write_prompts(tmp_path / "p.jsonl", 2)
    out = tmp_path / "t.jsonl"
    res = cli_run(
        "--prompts",
        str(prompts),
        "--out",
        str(out),
        "--teacher",
        f"anthropic:{MODEL}",
        "--temperature",
        "0.7",
    )
    assert res.exit_code == 2 and "--temperature" in res.stderr and "2026-10-21" in res.stderr
    assert not out.exists() and sum(fake.arrivals.values()) == 0


def test_dry_run_estimates_and_sends_nothing(tmp_path, monkeypatch):
    monkeypatch.delenv("ANTHROPIC_API_KEY", raising=False)  # no key needed to estimate
    prompts = write_prompts(tmp_path / "p.jsonl", 10)
    out = tmp_path / "t.jsonl"
    res = cli_run(
        "--prompts", str(prompts), "--out", str(out), "--teacher", f"anthropic:{MODEL}", "--dry-run"
    )
    assert res.exit_code == 0, res.output
    assert "dry run: 10 request(s)" in res.stderr and "characters / 3.5" in res.stderr
    assert not out.exists() and not sidecar(out, "config.json").exists()
    est = collect(
        CollectConfig(
            prompts=str(prompts),
            out=str(out),
            teacher=f"anthropic:{MODEL}",
            dry_run=True,
            max_tokens=1000,
        ),
        echo=lambda s: None,
    ).estimate
    # at most: every answer runs to max_tokens -> 10 x 1,000 x $15/M = $0.15 plus input
    assert est["cost_max_usd"] == pytest.approx(0.15 + est["input_tokens"] * 3e-6)
    batch = collect(
        CollectConfig(
            prompts=str(prompts),
            out=str(out),
            teacher=f"anthropic:{MODEL}",
            dry_run=True,
            max_tokens=1000,
            batch=True,
        ),
        echo=lambda s: None,
    ).estimate
    assert batch["cost_max_usd"] == pytest.approx(est["cost_max_usd"] / 2)


def test_cost_equals_recorded_usage_at_table_prices(fake, tmp_path):
    prices_file = tmp_path / "prices.yaml"
    prices_file.write_text(
        "models:\n  claude-sonnet-4-6: {input: 2, output: 10, cache_write: 4, cache_read: 0.5}\n"
    )
    prompts = write_prompts(tmp_path / "p.jsonl", 7)
    out = tmp_path / "t.jsonl"
    system = "Follow the house style carefully. " * 150  # long enough to be cached
    s = collect(
        CollectConfig(
            prompts=str(prompts),
            out=str(out),
            teacher=f"anthropic:{MODEL}",
            prices=str(prices_file),
            system=system,
        ),
        echo=lambda s: None,
    )
    recs = read_records(out)
    total = add_usage(zero_usage(), {})
    for r in recs:
        add_usage(total, r["usage"])
    table = load_prices(prices_file)
    assert total["cache_creation_input_tokens"] > 0 and total["cache_read_input_tokens"] > 0
    assert s.usage == total
    assert s.cost_usd == pytest.approx(sum(r["cost_usd"] for r in recs), abs=1e-9)
    assert s.cost_usd == pytest.approx(table.cost(MODEL, total), abs=1e-9)
    assert s.cost_usd != pytest.approx(PriceTable().cost(MODEL, total))  # the override was used


def test_budget_stops_before_it_is_exceeded_and_a_rerun_continues(fake, tmp_path):
    prompts = write_prompts(tmp_path / "p.jsonl", 10)
    out = tmp_path / "t.jsonl"
    worst = worst_case_cost(PriceTable(), MODEL, "task 0: write a parser", None, 100)
    cfg = CollectConfig(
        prompts=str(prompts),
        out=str(out),
        teacher=f"anthropic:{MODEL}",
        max_tokens=100,
        concurrency=2,
        budget=round(worst * 3.5, 6),
    )
    with pytest.raises(BudgetExceeded, match="not sent") as e:
        collect(cfg, echo=lambda s: None)
    s = e.value.summary
    assert 3 <= s.done < 10 and s.not_sent == 10 - s.done
    assert s.cost_usd <= cfg.budget
    cfg.budget = 10.0
    assert collect(cfg, echo=lambda s: None).done == 10 - s.done
    assert len(read_records(out)) == 10 and fake.duplicates() == 0


def test_budget_exit_code_and_summary_on_the_cli(fake, tmp_path):
    prompts = write_prompts(tmp_path / "p.jsonl", 4)
    res = cli_run(
        "--prompts",
        str(prompts),
        "--out",
        str(tmp_path / "t.jsonl"),
        "--teacher",
        f"anthropic:{MODEL}",
        "--budget",
        "0.000001",
    )
    assert (
        res.exit_code == 1
        and "stopped at --budget" in res.stderr
        and "4 not sent (budget)" in res.stderr
    )


def test_failures_are_counted_logged_and_retried_by_a_rerun(fake, tmp_path):
    prompts = write_prompts(tmp_path / "p.jsonl", 4)
    out = tmp_path / "t.jsonl"
    fake.faults.append(Fault("529", times=3, match="task 2:"))
    cfg = CollectConfig(prompts=str(prompts), out=str(out), teacher=f"anthropic:{MODEL}")
    s = collect(cfg, teacher=fast_teacher(fake, max_attempts=3), echo=lambda s: None)
    assert (s.done, s.failed) == (3, 1) and "529" in s.failures[0]["error"]
    errors = [json.loads(x) for x in sidecar(out, "errors.jsonl").read_text().splitlines()]
    assert errors[0]["id"] == "p02" and errors[0]["retryable"]
    s2 = collect(cfg, teacher=fast_teacher(fake), echo=lambda s: None)
    assert (s2.done, s2.skipped) == (1, 3) and len(read_records(out)) == 4


def test_faults_everywhere_still_one_answer_per_prompt(fake, tmp_path):
    prompts = write_prompts(tmp_path / "p.jsonl", 12)
    out = tmp_path / "t.jsonl"
    fake.faults += [
        Fault("429", retry_after=0.05, times=3),
        Fault("529", match="task 4:"),
        Fault("500", match="task 5:"),
        Fault("drop", match="task 6:"),
        Fault("slow", delay=1.2, match="task 7:"),
    ]
    cfg = CollectConfig(
        prompts=str(prompts), out=str(out), teacher=f"anthropic:{MODEL}", concurrency=4
    )
    s = collect(cfg, teacher=fast_teacher(fake, concurrency=4, timeout_s=0.5), echo=lambda s: None)
    assert s.done == 12 and s.failed == 0 and s.lowest_concurrency < 4
    assert sorted(r["id"] for r in read_records(out)) == [f"p{i:02d}" for i in range(12)]
    assert fake.duplicates() <= 1  # only the slow reply, paid once by the server and once on retry


def test_wrong_key_fails_in_seconds_and_writes_nothing_paid(fake, tmp_path, monkeypatch):
    monkeypatch.setenv("ANTHROPIC_API_KEY", "sk-ant-api03-not-the-right-one")
    prompts = write_prompts(tmp_path / "p.jsonl", 30)
    out = tmp_path / "t.jsonl"
    res = cli_run("--prompts", str(prompts), "--out", str(out), "--teacher", f"anthropic:{MODEL}")
    assert res.exit_code == 2 and "rejected the API key" in res.stderr
    assert "not-the-right-one" not in res.output
    assert read_records(out) == [] and sum(fake.paid.values()) == 0
    assert sum(fake.arrivals.values()) <= 8


def test_missing_key_fails_before_writing(tmp_path, monkeypatch):
    monkeypatch.delenv("ANTHROPIC_API_KEY", raising=False)
    prompts = write_prompts(tmp_path / "p.jsonl", 3)
    out = tmp_path / "t.jsonl"
    res = cli_run("--prompts", str(prompts), "--out", str(out), "--teacher", f"anthropic:{MODEL}")
    assert res.exit_code == 2 and "export ANTHROPIC_API_KEY=" in res.stderr
    assert not out.exists() and not sidecar(out, "config.json").exists()


def test_the_key_never_reaches_a_file_or_the_output(fake, tmp_path):
    prompts = write_prompts(tmp_path / "p.jsonl", 6)
    out_dir = tmp_path / "run"
    fake.faults += [Fault("529", match="task 1:"), Fault("400", match="task 2:")]
    res1 = cli_run(
        "--prompts",
        str(prompts),
        "--out",
        str(out_dir / "sync.jsonl"),
        "--teacher",
        f"anthropic:{MODEL}",
    )
    res2 = cli_run(
        "--prompts",
        str(prompts),
        "--out",
        str(out_dir / "batch.jsonl"),
        "--teacher",
        f"anthropic:{MODEL}",
        "--batch",
        "--poll-interval",
        "0.05",
    )
    assert res1.exit_code == 0 and res2.exit_code == 0, res2.output
    files = [p for p in out_dir.rglob("*") if p.is_file()]
    assert len(files) >= 5  # records, configs, errors, batch state
    for p in files:
        assert TEST_KEY.encode() not in p.read_bytes(), p
    assert TEST_KEY not in res1.output + res2.output


# ---- bad input: exit 2, file:line and the fix, nothing written ---------------------------------
BAD = {
    "invalid_json": (
        b'{"id": "a", "prompt": "ok"}\n{"id": "b", "prompt": \n',
        ":2:",
        "invalid JSON",
    ),
    "missing_prompt": (b'{"id": "a", "prompt": "ok"}\n{"id": "b"}\n', ":2:", "no 'prompt'"),
    "duplicate_id": (
        b'{"id": "a", "prompt": "ok"}\n{"id": "a", "prompt": "again"}\n',
        ":2:",
        "duplicate id",
    ),
    "duplicate_text": (
        b'{"id": "a", "prompt": "ok"}\n{"id": "b", "prompt": "ok"}\n',
        ":2:",
        "same text",
    ),
    "empty_file": (b"", "p.jsonl", "no prompts"),
    "non_utf8": (b'{"id": "a", "prompt": "caf\xe9"}\n', ":1:", "UTF-8"),
    "too_large": (
        b'{"id": "a", "prompt": "ok"}\n'
        + json.dumps({"id": "b", "prompt": "x" * 900_000}).encode()
        + b"\n",
        ":2:",
        "too large",
    ),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_prompt_files_exit_2_with_file_line_and_fix(fake, tmp_path, case):
    data, where, what = BAD[case]
    prompts = tmp_path / "p.jsonl"
    prompts.write_bytes(data)
    out = tmp_path / "out" / "t.jsonl"
    res = cli_run("--prompts", str(prompts), "--out", str(out), "--teacher", f"anthropic:{MODEL}")
    assert res.exit_code == 2, res.output
    assert (
        str(prompts) in res.stderr
        and where in res.stderr
        and what in res.stderr
        and "fix:" in res.stderr
    )
    assert not out.parent.exists() and sum(fake.arrivals.values()) == 0


def test_unknown_model_price_fails_before_sending(fake, tmp_path):
    prompts = write_prompts(tmp_path / "p.jsonl", 2)
    with pytest.raises(ConfigError, match="--prices FILE"):
        collect(
            CollectConfig(
                prompts=str(prompts), out=str(tmp_path / "t.jsonl"), teacher="anthropic:claude-x-9"
            ),
            echo=lambda s: None,
        )
    assert sum(fake.arrivals.values()) == 0


def test_existing_file_that_is_not_teacher_data_is_refused(fake, tmp_path):
    prompts = write_prompts(tmp_path / "p.jsonl", 2)
    out = tmp_path / "t.jsonl"
    out.write_text('{"messages": []}\n')
    with pytest.raises(DataError, match="not a teacher record"):
        collect(
            CollectConfig(prompts=str(prompts), out=str(out), teacher=f"anthropic:{MODEL}"),
            echo=lambda s: None,
        )


def test_price_file_errors_name_the_problem(tmp_path):
    p = tmp_path / "prices.json"
    p.write_text('{"models": {"m": {"input": 1}}}')
    with pytest.raises(ConfigError, match="needs input and output"):
        load_prices(p)
    p.write_text('{"batch_discount": 2}')
    with pytest.raises(ConfigError, match="batch_discount"):
        load_prices(p)
    assert (
        PriceTable().price("claude-sonnet-4-5-20250929").input == 3.0
    )  # dated ids use their family
