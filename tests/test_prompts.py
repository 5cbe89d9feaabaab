"""The shipped prompt set, near-duplicate checks, and `mlx-distill expand` through the fake API."""

from __future__ import annotations

import json
import re
from collections import Counter
from pathlib import Path

import pytest
from click.testing import CliRunner

from mlx_distill.errors import ConfigError
from mlx_distill.expand import ExpandConfig, cli, expand, parse_variants
from mlx_distill.prompts import (
    jaccard,
    load_prompts,
    near_duplicate,
    similarity,
)
from tests.fake_anthropic import TEST_KEY, FakeAnthropic, user_text

ROOT = Path(__file__).resolve().parent.parent
BASE = ROOT / "prompts" / "base.jsonl"
EXPANDED = ROOT / "prompts" / "expanded.jsonl"
HELDOUT = ROOT / "prompts" / "heldout.jsonl"

# The reference run's four held-out comparison prompts, described independently of
# prompts/heldout.jsonl (which another file owns): a training prompt on any of these
# topics would leak the comparison into training data.
HELDOUT_TOPICS = {
    "balanced binary tree": lambda t: "balanced" in t and "tree" in t,
    "thread-safe connection pool": lambda t: "connection" in t and "pool" in t,
    "employees above their department's average salary": lambda t: (
        bool(re.search(r"salar", t)) and ("average" in t or "avg" in t or "department" in t)
    ),
    "TTL cache decorator": lambda t: (
        bool(re.search(r"\bttl", t))
        or "time-to-live" in t
        or "time to live" in t
        or ("cache" in t and "expir" in t)
    ),
}
PARAPHRASES = {
    "balanced binary tree": "Check if a binary tree is balanced in Python.",
    "thread-safe connection pool": "Implement a thread-safe connection pool class in Python.",
    "employees above their department's average salary": "Write a SQL query listing employees whose salary is above their department's average.",
    "TTL cache decorator": "Write a Python TTL cache decorator whose entries expire.",
}


def test_base_set_is_32_varied_prompts():
    base = load_prompts(BASE)
    assert len(base) == 32 and {p.source for p in base} == {"base"}
    assert [p.id for p in base] == [f"base-{i:02d}" for i in range(1, 33)]
    langs = Counter(p.language for p in base)
    assert set(langs) == {"python", "sql", "javascript", "typescript", "bash"}
    cats = {p.category for p in base}
    for needed in (
        "data-structures",
        "concurrency",
        "caching",
        "parsing",
        "api",
        "testing",
        "async",
        "error-handling",
        "sql",
        "shell",
    ):
        assert needed in cats
    assert all(40 <= len(p.prompt) <= 400 for p in base)


def test_expanded_set_is_72_variants_whose_ids_record_their_parent():
    base_ids = {p.id for p in load_prompts(BASE)}
    exp = load_prompts(EXPANDED)
    assert len(exp) == 72 and {p.source for p in exp} == {"expanded"}
    for p in exp:
        parent, _, v = p.id.partition(".v")
        assert parent in base_ids and v.isdigit() and p.extra["parent"] == parent
    assert len({p.id for p in exp} | base_ids) == 104


def test_no_prompt_is_a_near_duplicate_of_another():
    prompts = load_prompts(BASE) + load_prompts(EXPANDED)
    for i, a in enumerate(prompts):
        hit = near_duplicate(a.prompt, prompts[i + 1 :], 0.7, jaccard)
        assert hit is None, (a.id, hit[0].id, hit[1])


@pytest.mark.parametrize("topic", sorted(HELDOUT_TOPICS))
def test_no_training_prompt_touches_a_heldout_topic(topic):
    rule = HELDOUT_TOPICS[topic]
    assert rule(PARAPHRASES[topic].lower())  # the rule does catch a paraphrase
    for p in load_prompts(BASE) + load_prompts(EXPANDED):
        assert not rule(p.prompt.lower()), (p.id, topic)


def test_no_training_prompt_resembles_the_heldout_file():
    if not HELDOUT.exists():
        pytest.skip("prompts/heldout.jsonl not written yet")
    held = load_prompts(HELDOUT)
    assert len(held) == 4
    for p in load_prompts(BASE) + load_prompts(EXPANDED):
        hit = near_duplicate(p.prompt, held, 0.6)
        assert hit is None, (p.id, hit[0].id, hit[1])
    for text in PARAPHRASES.values():  # ... while the check catches paraphrases of them
        assert near_duplicate(text, held, 0.6) is not None, text


def test_similarity_catches_paraphrases_not_neighbours():
    a = "Write a Python function is_balanced(root) that checks whether a binary tree is height-balanced."
    assert similarity(a, "Check if a binary tree is balanced in Python") == 1.0
    assert similarity(a, "Serialize a binary tree to a string") <= 0.5
    assert (
        similarity("Write Python code", "Write Python code to parse TOML files") < 0.5
    )  # short: Jaccard
    assert (
        jaccard("Parse a CSV file in Python", "Parse a CSV file in TypeScript") < 0.7
    )  # language counts
    assert (
        jaccard("Parse a CSV file", "Parse a CSV file and stream it to S3") < 0.7
    )  # a new requirement


def test_parse_variants_json_or_list():
    assert parse_variants(
        'Sure!\n```json\n["Write a TOML parser in JS.", "Write an INI parser in Rust."]\n```', 5
    ) == ["Write a TOML parser in JS.", "Write an INI parser in Rust."]
    assert parse_variants(
        "1. Write a fast CSV splitter in Go.\n2) Write a YAML linter in Python.\nok", 1
    ) == ["Write a fast CSV splitter in Go."]
    assert parse_variants("no tasks here", 3) == []


def _expander(body: dict) -> str:
    text = user_text(body)
    parent = text.split("\n\n")[1]
    n = int(re.search(r"Write (\d+) new", text).group(1))
    extras = [
        "read the input from a gzip-compressed stream and report progress, in TypeScript.",
        "expose it as a REST endpoint with pagination and caching headers, in TypeScript.",
    ]
    variants = [f"{parent} Variant: {extras[k]}" for k in range(n - 2)]
    variants.append("Check whether a binary tree is balanced, in Python.")  # a held-out paraphrase
    variants.append(parent)  # a copy of its parent
    return json.dumps(variants)


def test_expand_drops_heldout_paraphrases_and_copies_and_resumes(tmp_path, monkeypatch):
    base = tmp_path / "base.jsonl"
    topics = [
        "Write a Python tokenizer for arithmetic.",
        "Write a Python HTTP router with path parameters.",
        "Write a Python report of monthly sales from a ledger.",
    ]
    base.write_text(
        "".join(
            json.dumps(
                {
                    "id": f"b{i}",
                    "prompt": t,
                    "category": "parsing",
                    "language": "python",
                    "source": "base",
                }
            )
            + "\n"
            for i, t in enumerate(topics)
        )
    )
    (tmp_path / "heldout.jsonl").write_text(
        json.dumps(
            {
                "id": "h1",
                "prompt": (
                    "Write a Python function is_balanced(root) that checks whether a binary tree is height-balanced."
                ),
                "source": "heldout",
            }
        )
        + "\n"
    )
    out = tmp_path / "expanded.jsonl"
    with FakeAnthropic(responder=_expander) as fake:
        monkeypatch.setenv("ANTHROPIC_API_KEY", TEST_KEY)
        monkeypatch.setenv("ANTHROPIC_BASE_URL", fake.base_url)
        res = CliRunner().invoke(
            cli,
            [
                "--prompts",
                str(base),
                "--out",
                str(out),
                "--per-prompt",
                "4",
                "--teacher",
                "anthropic:claude-sonnet-4-6",
            ],
            catch_exceptions=False,
        )
        assert res.exit_code == 0, res.output
        assert "dropped 3 near held-out, 3 near-duplicates" in res.stderr
        got = load_prompts(out)
        assert len(got) == 6
        assert sorted(p.id for p in got) == ["b0.v1", "b0.v2", "b1.v1", "b1.v2", "b2.v1", "b2.v2"]
        assert all(p.source == "expanded" and p.extra["parent"] == p.id.split(".")[0] for p in got)
        assert {p.language for p in got} == {"typescript"}
        again = expand(
            ExpandConfig(prompts=str(base), out=str(out), teacher="anthropic:claude-sonnet-4-6"),
            echo=lambda s: None,
        )
        assert (
            again["asked"] == 0 and again["skipped_parents"] == 3 and sum(fake.paid.values()) == 3
        )


def test_expand_rejects_bad_flags(tmp_path):
    with pytest.raises(ConfigError, match="--per-prompt"):
        expand(ExpandConfig(prompts=str(BASE), out=str(tmp_path / "x.jsonl"), per_prompt=0))
