"""The LLM judge through the real SDK against the loopback fake API, with scripted verdicts."""

from __future__ import annotations

import json
import re
import statistics
from collections import Counter

import anthropic
import pytest

from mlx_distill.errors import ConfigError
from mlx_distill.judge import (
    BIAS_NOTE,
    JudgeConfig,
    JudgeItem,
    judge_available,
    judge_items,
    validate_pair,
    validate_single,
)
from mlx_distill.pricing import PriceTable
from mlx_distill.rubric import DIMENSION_KEYS
from tests.fake_anthropic import TEST_KEY, FakeAnthropic, user_text

ANSWERS = {
    "teacher": "## Overview\nANS_T\n```python\ndef f(x: int) -> int: ...\n```",
    "base": "ANS_B def f(x): return x",
    "distilled": "## Overview\nANS_D\n```python\ndef f(x: int): ...\n```",
}
LEVEL = {"ANS_T": 9, "ANS_B": 4, "ANS_D": 7}


def items(n: int = 2) -> list[JudgeItem]:
    return [JudgeItem(f"h{i}", f"Write a function number {i}.", dict(ANSWERS)) for i in range(n)]


def block(text: str, tag: str) -> str:
    m = re.search(rf"<{tag}>\n(.*?)\n</{tag}>", text, re.S)
    return m.group(1) if m else ""


def scores_for(answer: str, jitter: float = 0.0) -> dict:
    level = next(v for k, v in LEVEL.items() if k in answer)
    return {"scores": {d: level + jitter for d in DIMENSION_KEYS}, "rationale": f"level {level}"}


class Script:
    """A scripted judge: prefers the answer with more ANS_ level, or always "A" (position bias)."""

    def __init__(
        self,
        pair_mode: str = "prefer",
        bad_first: int = 0,
        bad_always: str | None = None,
        jitters: tuple[float, ...] = (0.0,),
    ):
        self.pair_mode, self.bad_first, self.bad_always, self.jitters = (
            pair_mode,
            bad_first,
            bad_always,
            jitters,
        )
        self.seen: Counter[str] = Counter()

    def __call__(self, body: dict) -> str:
        text = user_text(body)
        self.seen[text] += 1
        n = self.seen[text]
        if "<answer_a>" in text:
            if self.pair_mode == "A":
                winner = "A"
            else:
                a, b = (
                    next(v for k, v in LEVEL.items() if k in block(text, t))
                    for t in ("answer_a", "answer_b")
                )
                winner = "A" if a > b else "B" if b > a else "tie"
            return json.dumps({"winner": winner, "rationale": "scripted"})
        answer = block(text, "answer")
        if self.bad_always and self.bad_always in answer:
            return "I think it is pretty good, 8/10."
        if n <= self.bad_first and "ANS_B" in answer:
            return '```json\n{"scores": {"correctness": 11}}\n```'  # invalid: out of range, dims missing
        return json.dumps(scores_for(answer, self.jitters[(n - 1) % len(self.jitters)]))


@pytest.fixture
def judge_env(monkeypatch):
    def start(script: Script) -> FakeAnthropic:
        fake = FakeAnthropic(responder=script)
        fake.start()
        monkeypatch.setenv("ANTHROPIC_API_KEY", TEST_KEY)
        monkeypatch.setenv("ANTHROPIC_BASE_URL", fake.base_url)
        started.append(fake)
        return fake

    started: list[FakeAnthropic] = []
    yield start
    for f in started:
        f.stop()


def test_single_and_pairwise_in_both_orders(judge_env):
    fake = judge_env(Script())
    res = judge_items(items(2), JudgeConfig())
    json.dumps(res)  # JSON-serialisable
    assert res["judge_model"] == "claude-opus-4-6" and res["repeats"] == 1
    assert res["calls"] == 2 * (3 + 2) and res["misses"] == 0 and res["bias_note"] == BIAS_NOTE
    for pid in ("h0", "h1"):
        p = res["prompts"][pid]
        for label, level in (("teacher", 9), ("base", 4), ("distilled", 7)):
            s = p["single"][label]
            assert s["scores"] == {d: float(level) for d in DIMENSION_KEYS} and s["n"] == 1
            assert (
                s["std"] == {d: 0.0 for d in DIMENSION_KEYS} and s["rationale"] == f"level {level}"
            )
        pw = p["pairwise"]
        assert pw["winner"] == "distilled" and pw["flipped"] is False
        assert sorted(tuple(v["order"]) for v in pw["votes"]) == [
            ("base", "distilled"),
            ("distilled", "base"),
        ]
        assert all(v["winner"] == "distilled" for v in pw["votes"])
    # blind: labels never reach the judge; teacher graded without a reference, the students with one
    for body in fake.bodies:
        text = user_text(body).lower() + json.dumps(body.get("system", "")).lower()
        assert not re.search(r"\b(teacher|base|distilled|student|claude)\b", text)
        assert "temperature" not in body and body["model"] == "claude-opus-4-6"
    singles = [user_text(b) for b in fake.bodies if "<answer>" in user_text(b)]
    for text in singles:
        has_ref = "<reference_answer>" in text
        assert has_ref == ("ANS_T" not in block(text, "answer"))
        if has_ref:
            assert "ANS_T" in block(text, "reference_answer")


def test_order_randomized_by_seed(judge_env):
    fake = judge_env(Script())
    judge_items(items(6), JudgeConfig(seed=1))
    firsts = []
    for body in fake.bodies:
        text = user_text(body)
        if "<answer_a>" in text:
            firsts.append("ANS_D" in block(text, "answer_a"))
    assert len(firsts) == 12 and 0 < sum(firsts) < 12


def test_a_verdict_that_flips_with_the_order_is_a_flagged_tie(judge_env):
    judge_env(Script(pair_mode="A"))  # always prefers whatever is shown first
    res = judge_items(items(1), JudgeConfig())
    pw = res["prompts"]["h0"]["pairwise"]
    assert pw["winner"] == "tie" and pw["flipped"] is True
    assert {v["winner"] for v in pw["votes"]} == {"base", "distilled"}


def test_an_invalid_reply_is_retried_once(judge_env):
    fake = judge_env(Script(bad_first=1))
    res = judge_items(items(1), JudgeConfig())
    assert res["misses"] == 0 and res["calls"] == 5 + 1
    assert res["prompts"]["h0"]["single"]["base"]["scores"]["correctness"] == 4.0
    assert sum(fake.paid.values()) == 6


def test_twice_unparseable_is_a_miss_not_a_crash(judge_env):
    judge_env(Script(bad_always="ANS_B"))
    res = judge_items(items(2), JudgeConfig())
    assert res["misses"] == 2 and res["calls"] == 2 * 5 + 2
    for pid in ("h0", "h1"):
        single = res["prompts"][pid]["single"]
        assert "base" not in single and set(single) == {"teacher", "distilled"}
        assert res["prompts"][pid]["pairwise"]["winner"] == "distilled"


def test_repeats_give_mean_and_spread(judge_env):
    judge_env(Script(jitters=(-1.0, 0.0, 1.0)))
    res = judge_items(items(1), JudgeConfig(repeats=3))
    t = res["prompts"]["h0"]["single"]["teacher"]
    assert t["n"] == 3 and t["scores"]["correctness"] == pytest.approx(9.0)
    assert t["std"]["correctness"] == pytest.approx(statistics.pstdev([8.0, 9.0, 10.0]), abs=1e-3)
    assert len(res["prompts"]["h0"]["pairwise"]["votes"]) == 6


def test_cost_is_the_recorded_usage_at_opus_prices(judge_env):
    judge_env(Script())
    res = judge_items(items(1), JudgeConfig())
    assert res["usage"]["input_tokens"] > 0 and res["usage"]["output_tokens"] > 0
    assert res["cost_usd"] == pytest.approx(
        PriceTable().cost("claude-opus-4-6", res["usage"]), abs=1e-9
    )
    assert res["cost_usd"] == pytest.approx(
        (res["usage"]["input_tokens"] * 5 + res["usage"]["output_tokens"] * 25) / 1e6
    )


def test_missing_answers_are_skipped_not_crashed(judge_env):
    judge_env(Script())
    item = JudgeItem("h9", "Task.", {"base": ANSWERS["base"], "distilled": ANSWERS["distilled"]})
    res = judge_items([item], JudgeConfig())
    assert set(res["prompts"]["h9"]["single"]) == {"base", "distilled"} and res["misses"] == 0


def test_an_injected_async_client_is_used(judge_env, monkeypatch):
    fake = judge_env(Script())
    monkeypatch.delenv("ANTHROPIC_API_KEY")
    client = anthropic.AsyncAnthropic(api_key=TEST_KEY, base_url=fake.base_url, max_retries=0)
    res = judge_items(items(1), JudgeConfig(model="anthropic:claude-sonnet-4-6"), client=client)
    assert res["judge_model"] == "claude-sonnet-4-6" and res["misses"] == 0


def test_wrong_key_raises_config_error(judge_env, monkeypatch):
    judge_env(Script())
    monkeypatch.setenv("ANTHROPIC_API_KEY", "sk-ant-wrong")
    with pytest.raises(ConfigError, match="rejected the API key"):
        judge_items(items(1), JudgeConfig())


def test_judge_available_says_why_not(monkeypatch):
    monkeypatch.delenv("ANTHROPIC_API_KEY", raising=False)
    ok, why = judge_available(JudgeConfig())
    assert not ok and "ANTHROPIC_API_KEY" in why and "skipped" in why
    monkeypatch.setenv("ANTHROPIC_API_KEY", "sk-ant-x")
    assert judge_available(JudgeConfig()) == (True, "")
    ok, why = judge_available(JudgeConfig(model="demo"))
    assert not ok and "anthropic:MODEL" in why


def test_validation_rules():
    good = {"scores": dict.fromkeys(DIMENSION_KEYS, 7), "rationale": "fine"}
    assert validate_single(json.dumps(good)) == (dict.fromkeys(DIMENSION_KEYS, 7.0), "fine")
    assert validate_single("```json\n" + json.dumps(good) + "\n```")[0]["structure"] == 7.0
    for bad in (
        {**good, "scores": {**good["scores"], "structure": 11}},
        {**good, "scores": {**good["scores"], "structure": "8"}},
        {**good, "scores": {**good["scores"], "structure": True}},
        {"scores": {k: 5 for k in DIMENSION_KEYS[:4]}},
    ):
        assert validate_single(json.dumps(bad)) is None
    assert validate_single("no json") is None
    assert validate_pair('{"winner": "b", "rationale": "x"}') == ("B", "x")
    assert validate_pair('{"winner": "Tie"}') == ("tie", "")
    assert validate_pair('{"winner": "C"}') is None
