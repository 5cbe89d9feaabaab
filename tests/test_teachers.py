"""Teacher interface and the Anthropic provider: real SDK, real HTTP, loopback fake API."""

from __future__ import annotations

import time
from email.utils import formatdate

import pytest

from mlx_distill.errors import ConfigError
from mlx_distill.pricing import USAGE_FIELDS
from mlx_distill.teachers import (
    Failure,
    Reply,
    Request,
    TeacherFatal,
    make_teacher,
    style_prompt,
    style_prompt_path,
)
from mlx_distill.teachers.anthropic import (
    AnthropicTeacher,
    cacheable,
    parse_retry_after,
    ratelimit_wait,
)
from tests.fake_anthropic import TEST_KEY, FakeAnthropic, Fault


@pytest.fixture
def fake():
    with FakeAnthropic() as f:
        yield f


def teacher(fake: FakeAnthropic, **kw) -> AnthropicTeacher:
    kw.setdefault("backoff_s", 0.01)
    return AnthropicTeacher(
        "claude-sonnet-4-6", api_key=kw.pop("api_key", TEST_KEY), base_url=fake.base_url, **kw
    )


def run(
    t: AnthropicTeacher, n: int, prefix: str = "p", system: str | None = None
) -> dict[str, Reply | Failure]:
    out: dict[str, Reply | Failure] = {}
    reqs = [Request(f"k{i}", f"{prefix}{i}: write a function", system, 200) for i in range(n)]
    t.run(reqs, lambda r, o: out.__setitem__(r.key, o))
    return out


# ---- specs and the style prompt ------------------------------------------------------------
def test_make_teacher_specs():
    t = make_teacher("anthropic:claude-sonnet-4-6")
    assert t.paid and t.model == "claude-sonnet-4-6" and t.spec == "anthropic:claude-sonnet-4-6"
    d = make_teacher("demo")
    assert not d.paid and d.spec == "demo" and d.default_system == style_prompt()
    loc = make_teacher("local:/some/dir")
    assert loc.spec == "local:/some/dir" and loc.default_system is None
    with pytest.raises(ConfigError, match="anthropic:claude-sonnet-4-6"):
        make_teacher("claude-sonnet-4-6")
    with pytest.raises(ConfigError, match="expected anthropic:MODEL"):
        make_teacher("gpt-4o")
    with pytest.raises(ConfigError, match="needs a model"):
        make_teacher("anthropic:")


def test_style_prompt_asks_for_the_claude_like_layout():
    text = style_prompt()
    assert style_prompt_path().name == "teacher_style.md"
    for must in ("## Overview", "## Implementation", "## Usage", "docstring", "raise"):
        assert must in text
    # A shared prefix the 135M model re-reads per sequence: keep it near 500 tokens.
    assert len(text) < 3000


def test_missing_key_says_how_to_set_it(monkeypatch):
    monkeypatch.delenv("ANTHROPIC_API_KEY", raising=False)
    with pytest.raises(ConfigError, match=r"export ANTHROPIC_API_KEY="):
        make_teacher("anthropic:claude-sonnet-4-6").check_ready()


# ---- replies --------------------------------------------------------------------------------
def test_reply_has_text_stop_reason_usage_request_id_latency(fake):
    out = run(teacher(fake), 3)
    assert len(out) == 3
    for key, r in out.items():
        assert isinstance(r, Reply)
        assert f"p{key[1:]}: write" in r.text
        assert r.stop_reason == "end_turn"
        assert set(r.usage) == set(USAGE_FIELDS) and all(
            isinstance(v, int) for v in r.usage.values()
        )
        assert r.usage["input_tokens"] > 0 and r.usage["output_tokens"] > 0
        assert (
            r.request_id.startswith("req_") and r.latency_s > 0 and r.model == "claude-sonnet-4-6"
        )
    h = fake.seen_headers[0]
    assert h["authorization"] == f"Bearer {TEST_KEY}" and h["anthropic-version"]


def test_base_url_from_environment(fake, monkeypatch):
    monkeypatch.setenv("ANTHROPIC_API_KEY", TEST_KEY)
    monkeypatch.setenv("ANTHROPIC_BASE_URL", fake.base_url)
    r = make_teacher("anthropic:claude-haiku-4-5").complete("hello there", max_tokens=50)
    assert r.text and sum(fake.paid.values()) == 1


# ---- the retry policy ----------------------------------------------------------------------
def test_429_honours_retry_after_and_halves_concurrency(fake):
    fake.faults.append(Fault("429", retry_after=0.6))
    t = teacher(fake, concurrency=8)
    t0 = time.monotonic()
    out = run(t, 1)
    assert isinstance(out["k0"], Reply)
    assert time.monotonic() - t0 >= 0.6
    assert sum(fake.arrivals.values()) == 2 and t.limiter.lowest == 4


def test_sustained_429s_lose_nothing(fake):
    # Six 429s in a row on one prompt: the SDK's default max_retries=2 would give up.
    fake.faults.append(Fault("429", retry_after=0.05, times=6, match="p3:"))
    fake.latency = 0.02
    t = teacher(fake, concurrency=4)
    out = run(t, 12)
    assert all(isinstance(o, Reply) for o in out.values())
    assert fake.arrivals["p3: write a function"] == 7
    assert t.limiter.lowest < 4
    assert fake.duplicates() == 0


def test_529_500_dropped_and_slow_replies_are_retried(fake):
    fake.faults += [
        Fault("529", match="p0:"),
        Fault("500", match="p1:"),
        Fault("drop", match="p2:"),
        Fault("slow", delay=1.5, match="p3:"),
    ]
    t = teacher(fake, timeout_s=0.5)
    out = run(t, 5)
    assert all(isinstance(o, Reply) for o in out.values()), out
    for i in range(4):
        assert fake.arrivals[f"p{i}: write a function"] == 2
    assert fake.arrivals["p4: write a function"] == 1


def test_gives_up_after_max_attempts_as_a_retryable_failure(fake):
    fake.faults.append(Fault("529", times=10))
    out = run(teacher(fake, max_attempts=3), 1)
    assert isinstance(out["k0"], Failure) and out["k0"].retryable and "529" in out["k0"].error
    assert sum(fake.arrivals.values()) == 3


def test_bad_request_fails_that_prompt_only(fake):
    fake.faults.append(Fault("400", match="p1:"))
    out = run(teacher(fake), 3)
    assert isinstance(out["k1"], Failure) and not out["k1"].retryable and out["k1"].status == 400
    assert isinstance(out["k0"], Reply) and isinstance(out["k2"], Reply)
    assert fake.arrivals["p1: write a function"] == 1


def test_wrong_key_fails_fast_without_retries(fake):
    t = teacher(fake, api_key="sk-ant-wrong-key-xyz", concurrency=2)
    t0 = time.monotonic()
    with pytest.raises(ConfigError, match="rejected the API key") as e:
        run(t, 20)
    assert time.monotonic() - t0 < 5
    assert "sk-ant-wrong-key-xyz" not in str(e.value)
    assert sum(fake.arrivals.values()) <= 2 and sum(fake.paid.values()) == 0


def test_spend_limit_429_is_never_retried(fake):
    fake.faults.append(Fault("spend_limit", retry_after=0.01))
    with pytest.raises(TeacherFatal, match="spend limit"):
        run(teacher(fake, concurrency=1), 5)
    assert sum(fake.arrivals.values()) == 1


def test_exhausted_ratelimit_headers_pause_new_requests(fake):
    fake.faults.append(Fault("ratelimit", reset_s=0.6))
    run(teacher(fake, concurrency=1), 2)
    (t_first, _), (t_second, _) = fake.arrival_log
    assert t_second - t_first >= 0.45


def test_long_system_prompt_is_cached_and_written_once(fake):
    system = "You are a careful engineer. " * 200  # ~5,600 characters, ~1,600 tokens
    assert cacheable(system) and not cacheable("short")
    t = teacher(fake, concurrency=4)
    out = run(t, 6, system=system)
    writes = [o.usage["cache_creation_input_tokens"] for o in out.values()]
    reads = [o.usage["cache_read_input_tokens"] for o in out.values()]
    assert sum(1 for w in writes if w) == 1 and sum(1 for r in reads if r) == 5
    body = fake.bodies[0]
    assert body["system"][0]["cache_control"] == {"type": "ephemeral"}
    run(teacher(fake), 1, prefix="q", system="short")
    assert "cache_control" not in fake.bodies[-1]["system"][0]


def test_retry_after_and_reset_parsing():
    assert parse_retry_after({"retry-after": "2"}) == 2.0
    assert parse_retry_after({"retry-after-ms": "250", "retry-after": "9"}) == 0.25
    assert (
        parse_retry_after({"retry-after": formatdate()}) is None
    )  # dates: left to the reset headers
    assert parse_retry_after({}) is None
    now = 1_700_000_000.0
    reset = "2023-11-14T22:13:25Z"  # now + 5 s
    h = {"anthropic-ratelimit-requests-remaining": "0", "anthropic-ratelimit-requests-reset": reset}
    assert ratelimit_wait(h, now) == pytest.approx(5.0)
    h["anthropic-ratelimit-requests-remaining"] = "3"
    assert ratelimit_wait(h, now) is None
