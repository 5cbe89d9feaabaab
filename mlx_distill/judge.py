"""A blind LLM judge (Claude) on the reference run's five dimensions, 0-10 each.

Two modes, per prompt:

* **single**: each answer graded alone; base and distilled against the teacher's
  answer as a reference, the teacher without one;
* **pairwise**: base vs distilled, asked in **both** orders ("Answer A/B", labels
  hidden); a verdict that flips with the order is a tie with ``flipped: true``
  (position bias, not preference).

Replies are JSON, validated (all five dimensions, numbers in 0..10). An
unparseable or invalid reply is asked again once, then counted as a miss: that
score is absent, the run goes on. ``repeats`` > 1 gives a mean and a spread
(population std; no temperature is sent, since API version 2026-10-21 rejects
it, so the spread is the judge's sampling variance). Calls go through :class:`~mlx_distill.teachers.anthropic.AnthropicTeacher`
(the collector's client and retry policy). Without a key the caller skips the
judge: see :func:`judge_available`.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import statistics
from dataclasses import dataclass
from typing import Any

from mlx_distill.config import opt
from mlx_distill.errors import ConfigError
from mlx_distill.pricing import add_usage, load_prices, zero_usage
from mlx_distill.rubric import DIMENSION_KEYS, DIMENSIONS

BIAS_NOTE = (
    "A Claude judge grading Claude-like answers may prefer them (self-preference bias): the teacher's "
    "answers, and a distilled student that imitates their style, can score higher partly for looking "
    "like Claude. Read the judge next to the execution checks and style metrics, which have no such bias."
)
SYSTEM = (
    "You are a strict, fair senior software engineer grading answers to programming tasks. "
    "You are not told who wrote an answer; judge only what is written. "
    "Reply with one JSON object and nothing else."
)
_RUBRIC = "\n".join(
    f"- {key}: {label} (0 = absent or wrong, 10 = excellent)" for key, label in DIMENSIONS
)
_SCORES_JSON = "{" + ", ".join(f'"{k}": <0-10>' for k in DIMENSION_KEYS) + "}"
SINGLE_TEMPLATE = """<task>
{prompt}
</task>
{reference}
<answer>
{answer}
</answer>

Grade the answer on each dimension:
{rubric}
{ref_note}
Reply with JSON only: {{"scores": {scores}, "rationale": "<two or three sentences>"}}"""
REFERENCE_BLOCK = "\n<reference_answer>\n{ref}\n</reference_answer>\n"
REFERENCE_NOTE = (
    "Use the reference answer to check correctness and completeness; do not reward or "
    "penalize the answer for a different style.\n"
)
PAIR_TEMPLATE = """<task>
{prompt}
</task>

<answer_a>
{a}
</answer_a>

<answer_b>
{b}
</answer_b>

Which answer is better overall? Weigh correctness first, then structure and design, documentation, \
error handling and completeness. Their order is random; do not let it sway you.
Reply with JSON only: {{"winner": "A" | "B" | "tie", "rationale": "<two or three sentences>"}}"""


@dataclass
class JudgeItem:
    id: str
    prompt: str
    answers: dict[str, str]  # "teacher", "base", "distilled"


@dataclass
class JudgeConfig:
    model: str = opt("anthropic:claude-opus-4-6", "Judge model: any anthropic:MODEL.")
    repeats: int = opt(1, "Times each judgement is asked; more than 1 gives a mean and a spread.")
    max_tokens: int = opt(
        2048, "Max tokens of each judge reply (thinking models count their thinking too)."
    )
    concurrency: int = opt(4, "Judge requests in flight.")
    seed: int = opt(0, "Seed of the answer-order randomization.")
    max_answer_chars: int = opt(
        20000, "Cut longer answers (the judge sees a marker) to bound cost."
    )
    prices: str | None = opt(None, "JSON/YAML price table overriding the built-in one.")


def judge_available(cfg: JudgeConfig) -> tuple[bool, str]:
    """(True, "") when the judge can run; else (False, the one-line notice to show)."""
    if not cfg.model.startswith("anthropic:") or not cfg.model.split(":", 1)[1]:
        return False, f"judge model {cfg.model!r} is not anthropic:MODEL; the LLM judge is skipped"
    if not (
        os.environ.get("ANTHROPIC_API_KEY") or os.environ.get("ANTHROPIC_AUTH_TOKEN") or ""
    ).strip():
        return False, (
            "no ANTHROPIC_API_KEY: the LLM judge is skipped (export ANTHROPIC_API_KEY=sk-ant-... "
            "to enable it); execution checks and style metrics still score the answers"
        )
    return True, ""


def parse_json_object(text: str) -> dict[str, Any] | None:
    """The first-to-last ``{...}`` span of ``text`` as a JSON object (code fences allowed)."""
    start, end = text.find("{"), text.rfind("}")
    if start < 0 or end <= start:
        return None
    try:
        obj = json.loads(text[start : end + 1])
    except ValueError:
        return None
    return obj if isinstance(obj, dict) else None


def validate_single(text: str) -> tuple[dict[str, float], str] | None:
    """(scores, rationale) if the reply has all five dimensions as numbers in 0..10."""
    obj = parse_json_object(text)
    if obj is None:
        return None
    scores = obj.get("scores", obj)
    if not isinstance(scores, dict):
        return None
    out = {}
    for k in DIMENSION_KEYS:
        v = scores.get(k)
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0 <= v <= 10:
            return None
        out[k] = float(v)
    return out, str(obj.get("rationale", ""))


def validate_pair(text: str) -> tuple[str, str] | None:
    """("A" | "B" | "tie", rationale) from a pairwise reply."""
    obj = parse_json_object(text)
    if obj is None:
        return None
    w = str(obj.get("winner", "")).strip().strip('"').lower()
    w = {"a": "A", "answer a": "A", "b": "B", "answer b": "B", "tie": "tie", "draw": "tie"}.get(w)
    return (w, str(obj.get("rationale", ""))) if w else None


def _cut(text: str, limit: int) -> str:
    if len(text) <= limit:
        return text
    return text[:limit] + f"\n[... answer cut at {limit:,} characters ...]"


def _jobs(items: list[JudgeItem], cfg: JudgeConfig) -> list[dict[str, Any]]:
    """Every judge call to make: kind single (one model) or pair (one order), per repeat."""
    jobs = []
    for item in items:
        ans = {
            k: _cut(v, cfg.max_answer_chars) for k, v in item.answers.items() if isinstance(v, str)
        }
        ref = ans.get("teacher")
        for r in range(cfg.repeats):
            for label in ("teacher", "base", "distilled"):
                if label not in ans:
                    continue
                use_ref = ref is not None and label != "teacher"
                text = SINGLE_TEMPLATE.format(
                    prompt=item.prompt,
                    answer=ans[label],
                    rubric=_RUBRIC,
                    scores=_SCORES_JSON,
                    reference=REFERENCE_BLOCK.format(ref=ref) if use_ref else "",
                    ref_note=REFERENCE_NOTE if use_ref else "",
                )
                jobs.append(
                    {"id": item.id, "kind": "single", "label": label, "repeat": r, "text": text}
                )
            if "base" in ans and "distilled" in ans:
                first = ["base", "distilled"]
                random.Random(f"{cfg.seed}:{item.id}:{r}").shuffle(first)
                for order in (first, first[::-1]):
                    text = PAIR_TEMPLATE.format(
                        prompt=item.prompt, a=ans[order[0]], b=ans[order[1]]
                    )
                    jobs.append(
                        {
                            "id": item.id,
                            "kind": "pair",
                            "order": list(order),
                            "repeat": r,
                            "text": text,
                        }
                    )
    return jobs


def _make_teacher(cfg: JudgeConfig, client: Any) -> Any:
    from mlx_distill.teachers.anthropic import AnthropicTeacher

    if isinstance(client, AnthropicTeacher):
        return client
    model = cfg.model.split(":", 1)[1]
    return AnthropicTeacher(model, concurrency=cfg.concurrency, client=client)


def judge_items(items: list[JudgeItem], cfg: JudgeConfig, *, client: Any = None) -> dict[str, Any]:
    """Grade every item (single + pairwise, ``cfg.repeats`` times); see the module doc.

    ``client``: an ``AnthropicTeacher`` or an ``anthropic.AsyncAnthropic`` (tests point one
    at the fake API); by default one is made from ``ANTHROPIC_API_KEY``. A wrong key or
    model raises ConfigError; everything else degrades per call into counted misses.
    """
    from mlx_distill.teachers import Failure, Request

    if not cfg.model.startswith("anthropic:"):
        raise ConfigError(f"--judge-model {cfg.model!r}: the judge must be anthropic:MODEL")
    if cfg.repeats < 1:
        raise ConfigError(f"--repeats must be >= 1, got {cfg.repeats}")
    prices = load_prices(cfg.prices)
    teacher = _make_teacher(cfg, client)
    prices.price(teacher.model)  # unknown model: fail before any call
    jobs = {f"j{i}": job for i, job in enumerate(_jobs(items, cfg))}
    usage, calls, results = zero_usage(), [0], {}
    cost = [0.0]

    def on_result(req: Any, outcome: Any) -> None:
        calls[0] += 1
        job = jobs[req.key.split("/")[0]]
        if isinstance(outcome, Failure):
            job.setdefault("errors", []).append(outcome.error)
            return
        add_usage(usage, outcome.usage)
        cost[0] += prices.cost(teacher.model, outcome.usage)
        parsed = (validate_single if job["kind"] == "single" else validate_pair)(outcome.text)
        if parsed is not None:
            results[req.key.split("/")[0]] = parsed
        else:
            job.setdefault("errors", []).append(f"invalid reply: {outcome.text[:120]!r}")

    def requests(keys: list[str], attempt: int) -> list[Any]:
        # No temperature: API version 2026-10-21 rejects it, so each repeat samples at the
        # model's own default and the spread over --repeats is the judge's own variance.
        return [Request(f"{k}/{attempt}", jobs[k]["text"], SYSTEM, cfg.max_tokens) for k in keys]

    async def main() -> None:
        await teacher.arun(requests(list(jobs), 1), on_result)
        # one more try for replies that came back but did not validate (not for API failures,
        # which the retry policy already retried)
        again = [
            k
            for k, j in jobs.items()
            if k not in results and any(e.startswith("invalid") for e in j.get("errors", []))
        ]
        if again:
            await teacher.arun(requests(again, 2), on_result)

    if jobs:
        teacher.check_ready()
        asyncio.run(main())
    return {
        "judge_model": teacher.model,
        "repeats": cfg.repeats,
        "seed": cfg.seed,
        "calls": calls[0],
        "misses": sum(1 for k in jobs if k not in results),
        "usage": usage,
        "cost_usd": round(cost[0], 10),
        "bias_note": BIAS_NOTE,
        "prompts": _aggregate(items, jobs, results),
    }


def _aggregate(
    items: list[JudgeItem], jobs: dict[str, dict[str, Any]], results: dict[str, Any]
) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for item in items:
        mine = [(k, j) for k, j in jobs.items() if j["id"] == item.id]
        single: dict[str, Any] = {}
        for label in ("teacher", "base", "distilled"):
            got = [
                results[k]
                for k, j in mine
                if j["kind"] == "single" and j["label"] == label and k in results
            ]
            if not got:
                continue
            single[label] = {
                "scores": {
                    d: round(statistics.fmean(s[d] for s, _ in got), 3) for d in DIMENSION_KEYS
                },
                "std": {
                    d: round(statistics.pstdev([s[d] for s, _ in got]), 3) for d in DIMENSION_KEYS
                },
                "rationale": got[0][1],
                "n": len(got),
            }
        entry: dict[str, Any] = {"single": single}
        votes, verdicts, flipped = [], [], False
        repeats = sorted({j["repeat"] for _, j in mine if j["kind"] == "pair"})
        for r in repeats:
            picks = []
            for k, j in mine:
                if j["kind"] != "pair" or j["repeat"] != r or k not in results:
                    continue
                w, why = results[k]
                label = "tie" if w == "tie" else j["order"][0 if w == "A" else 1]
                votes.append({"order": j["order"], "winner": label, "rationale": why, "repeat": r})
                picks.append(label)
            if len(picks) == 2 and picks[0] != picks[1]:
                flip = "tie" not in picks  # each order picked the answer in the same position
                flipped = flipped or flip
                verdicts.append("tie")
            elif picks:
                verdicts.append(picks[0])
        if votes:
            b, d = verdicts.count("base"), verdicts.count("distilled")
            entry["pairwise"] = {
                "winner": "base" if b > d else "distilled" if d > b else "tie",
                "flipped": flipped,
                "votes": votes,
            }
        out[item.id] = entry
    return out
