"""`collect --batch` (Message Batches) and crash-resume of real collector processes (`kill -9`)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from mlx_distill.collect import CollectConfig, collect, read_records
from mlx_distill.errors import ConfigError
from mlx_distill.pricing import PriceTable
from mlx_distill.teachers import Reply, Request
from mlx_distill.teachers.anthropic import AnthropicTeacher
from mlx_distill.teachers.anthropic_batches import BatchRunner, BatchState, chunk, state_path_for
from tests.fake_anthropic import TEST_KEY, FakeAnthropic
from tests.test_collect import write_prompts

MODEL = "claude-sonnet-4-6"


@pytest.fixture
def fake(monkeypatch):
    with FakeAnthropic() as f:
        monkeypatch.setenv("ANTHROPIC_API_KEY", TEST_KEY)
        monkeypatch.setenv("ANTHROPIC_BASE_URL", f.base_url)
        yield f


def batch_cfg(prompts: Path, out: Path, **kw) -> CollectConfig:
    return CollectConfig(
        prompts=str(prompts),
        out=str(out),
        teacher=f"anthropic:{MODEL}",
        batch=True,
        poll_interval=0.05,
        **kw,
    )


def test_batch_records_match_on_custom_id_at_half_price(fake, tmp_path):
    prompts = write_prompts(tmp_path / "p.jsonl", 9)
    out = tmp_path / "t.jsonl"
    s = collect(batch_cfg(prompts, out), echo=lambda s: None)
    assert s.done == 9 and s.batches_submitted == 1
    recs = read_records(out)
    assert sorted(r["id"] for r in recs) == [f"p{i:02d}" for i in range(9)]
    table = PriceTable()
    for r in recs:  # results came back shuffled: each must carry its own prompt's answer
        assert r["prompt"][:40] in r["response"] and r["batch_id"].startswith("msgbatch_")
        assert r["cost_usd"] == pytest.approx(table.cost(MODEL, r["usage"]) / 2, abs=1e-12)
    body = fake.batches[recs[0]["batch_id"]]["requests"][0]
    assert len(body["custom_id"]) <= 64 and body["custom_id"].isalnum()
    state = json.loads(state_path_for(out).read_text())
    assert state["batches"][0]["collected"] is True
    assert collect(batch_cfg(prompts, out), echo=lambda s: None).done == 0  # resumed: nothing left
    assert fake.batch_creates == 1 and fake.duplicates() == 0


def test_errored_and_expired_items_are_resubmitted(fake, tmp_path):
    fake.batch_faults = {"task 1:": "errored", "task 3:": "expired", "task 4:": "canceled"}
    prompts = write_prompts(tmp_path / "p.jsonl", 6)
    out = tmp_path / "t.jsonl"
    s = collect(batch_cfg(prompts, out), echo=lambda s: None)
    assert s.done == 6 and s.failed == 0 and fake.batch_creates == 2
    assert len(fake.batches[read_records(out)[-1]["batch_id"]]["requests"]) in (3, 6)
    second = [b for b in fake.batches.values() if len(b["requests"]) == 3]
    assert len(second) == 1 and fake.duplicates() == 0


def test_items_failing_every_round_become_failures(fake, tmp_path):
    prompts = write_prompts(tmp_path / "p.jsonl", 3)
    out = tmp_path / "t.jsonl"

    class Always(dict):  # errored in every batch
        def items(self):
            return [("task 2:", "errored")]

        def __delitem__(self, key):
            pass

    fake.batch_faults = Always()
    s = collect(batch_cfg(prompts, out, batch_rounds=2), echo=lambda s: None)
    assert (s.done, s.failed) == (2, 1) and fake.batch_creates == 2


def test_requests_are_chunked_within_count_and_size_limits(fake, tmp_path):
    teacher = AnthropicTeacher(MODEL, api_key=TEST_KEY, base_url=fake.base_url)
    reqs = [Request(f"k{i:02d}", f"task {i}", None, 100) for i in range(7)]
    got: dict[str, Reply] = {}
    runner = BatchRunner(
        teacher, tmp_path / "s.batches.json", poll_min_s=0.01, poll_max_s=0.05, max_requests=3
    )
    runner.run(reqs, lambda r, o: got.__setitem__(r.key, o))
    assert fake.batch_creates == 3 and sorted(
        len(b["requests"]) for b in fake.batches.values()
    ) == [1, 3, 3]
    assert all(isinstance(o, Reply) and o.batch_id for o in got.values()) and len(got) == 7
    entries = [(r, {"custom_id": r.key, "params": teacher.params(r)}) for r in reqs]
    one = len(json.dumps(entries[0][1])) + 1
    assert [len(c) for c in chunk(entries, max_bytes=2 * one + 2)] == [2, 2, 2, 1]
    with pytest.raises(ConfigError, match="over the batch limit"):
        chunk(entries, max_bytes=10)


def test_state_from_other_settings_is_refused(fake, tmp_path):
    prompts = write_prompts(tmp_path / "p.jsonl", 2)
    out = tmp_path / "t.jsonl"
    state = BatchState(state_path_for(out))
    state.batches.append({"id": "msgbatch_old", "custom_ids": ["0" * 32], "collected": False})
    state.save()
    with pytest.raises(ConfigError, match="made from other prompts or settings"):
        collect(batch_cfg(prompts, out), echo=lambda s: None)
    assert fake.batch_creates == 0


def test_batch_needs_a_claude_teacher(tmp_path):
    prompts = write_prompts(tmp_path / "p.jsonl", 2)
    cfg = CollectConfig(
        prompts=str(prompts), out=str(tmp_path / "t.jsonl"), teacher="local:/nowhere", batch=True
    )
    with pytest.raises(ConfigError, match="--batch needs an anthropic: teacher"):
        collect(cfg, echo=lambda s: None)


# ---- real processes, killed with SIGKILL ---------------------------------------------------
def _collector(prompts: Path, out: Path, *extra: str) -> list[str]:
    return [
        sys.executable,
        "-m",
        "mlx_distill.collect",
        "--prompts",
        str(prompts),
        "--out",
        str(out),
        "--teacher",
        f"anthropic:{MODEL}",
        *extra,
    ]


def _wait_for(cond, timeout: float = 60.0) -> None:
    end = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > end:
            raise AssertionError("timed out waiting for the collector")
        time.sleep(0.02)


def _complete_lines(path: Path) -> int:
    return path.read_bytes().count(b"\n") if path.exists() else 0


@pytest.mark.slow
def test_kill_9_mid_run_resumes_with_duplicates_bounded_by_the_in_flight_window(fake, tmp_path):
    fake.latency = 0.15
    prompts = write_prompts(tmp_path / "p.jsonl", 40)
    out = tmp_path / "t.jsonl"
    concurrency = 4
    proc = subprocess.Popen(
        _collector(prompts, out, "--concurrency", str(concurrency)),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        _wait_for(lambda: _complete_lines(out) >= 10)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)
    finally:
        if proc.poll() is None:
            proc.kill()
    before = _complete_lines(out)
    assert 10 <= before < 40
    res = subprocess.run(
        _collector(prompts, out, "--concurrency", str(concurrency)),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert res.returncode == 0, res.stderr
    ids = [r["id"] for r in read_records(out)]
    assert sorted(ids) == [f"p{i:02d}" for i in range(40)]  # every prompt exactly once
    assert f"{40 - before} done" in res.stderr
    # only the requests in flight at the kill were paid twice
    print("paid duplicates after kill -9:", fake.duplicates(), "lines before:", before)
    assert fake.duplicates() <= concurrency


@pytest.mark.slow
def test_killed_batch_run_resumes_polling_instead_of_resubmitting(fake, tmp_path):
    fake.batch_latency = 2.0
    prompts = write_prompts(tmp_path / "p.jsonl", 8)
    out = tmp_path / "t.jsonl"
    proc = subprocess.Popen(
        _collector(prompts, out, "--batch", "--poll-interval", "0.2"),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    state = state_path_for(out)
    try:
        _wait_for(lambda: state.exists() and "msgbatch_" in state.read_text())
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert fake.batch_creates == 1 and _complete_lines(out) == 0
    s = collect(batch_cfg(prompts, out), echo=lambda s: None)
    assert s.done == 8 and s.batches_submitted == 0
    assert fake.batch_creates == 1 and fake.duplicates() == 0
    assert sorted(r["id"] for r in read_records(out)) == [f"p{i:02d}" for i in range(8)]
