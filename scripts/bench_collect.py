"""Benchmark: collecting the 104 prompts sequentially vs concurrently vs --batch, plus cost at scale.

The reference run took 24m40s for 104 prompts one at a time: 14.2 s per call.
This runs the real collector (real SDK, real HTTP) against the loopback fake
API with that latency divided by ``--scale`` (default 20: 0.71 s a call, so
the sequential pass takes ~75 s and the whole bench under two minutes), and
compares wall times. The fake answers with ~1,016-token texts (4 characters a
token), the length the reference run's $1.61 implies at Sonnet 4.6 prices, so
the recorded usage, and the cost-at-scale table built from its means, match
the reference run. Its batches end one call-latency after submission; real
batches take minutes to hours (24 h at most), so --batch is measured here for
correctness and cost, not as a wall-time win.

Usage: .venv/bin/python scripts/bench_collect.py [--scale 20]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import _benchlib  # noqa: E402

from mlx_distill.collect import CollectConfig, collect, read_records  # noqa: E402
from mlx_distill.pricing import (  # noqa: E402
    REFERENCE_MODEL,
    SCALES,
    cost_at_scale,
    reference_tokens_per_prompt,
)
from mlx_distill.prompts import load_prompts  # noqa: E402
from tests.fake_anthropic import TEST_KEY, FakeAnthropic, tokens, user_text  # noqa: E402

REFERENCE_CALL_S = 14.2


def responder_for(output_tokens: int):
    filler = "    # step: validate the input, handle the error, return the result\n"

    def respond(body: dict) -> str:
        head = f"## Overview\n\nAn answer to: {user_text(body)[:80]}\n\n```python\n"
        body_text = head + filler * (output_tokens * 4 // len(filler) + 1)
        return body_text[: output_tokens * 4 - 4] + "\n```"

    return respond


def run(
    mode: str, prompts: Path, workdir: Path, latency: float, out_tokens: int, concurrency: int
) -> dict:
    fake = FakeAnthropic(
        latency=latency, batch_latency=latency, responder=responder_for(out_tokens)
    )
    fake.start()
    os.environ["ANTHROPIC_API_KEY"] = TEST_KEY
    os.environ["ANTHROPIC_BASE_URL"] = fake.base_url
    out = workdir / f"{mode}.jsonl"
    cfg = CollectConfig(
        prompts=str(prompts),
        out=str(out),
        teacher=f"anthropic:{REFERENCE_MODEL}",
        max_tokens=2048,
        concurrency=concurrency,
        batch=mode == "batch",
        poll_interval=latency / 4,
    )
    t0 = time.perf_counter()
    try:
        s = collect(cfg, echo=lambda m: None, progress_stream=open(os.devnull, "w"))
    finally:
        wall = time.perf_counter() - t0
        fake.stop()
    recs = read_records(out)
    return {
        "mode": mode,
        "concurrency": concurrency if mode != "batch" else None,
        "wall_s": wall,
        "done": s.done,
        "failed": s.failed,
        "paid_duplicates": fake.duplicates(),
        "records": len(recs),
        "cost_usd": s.cost_usd,
        "mean_input_tokens": sum(r["usage"]["input_tokens"] for r in recs) / max(1, len(recs)),
        "mean_output_tokens": sum(r["usage"]["output_tokens"] for r in recs) / max(1, len(recs)),
        "peak_in_flight": fake.max_in_flight,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument(
        "--scale", type=float, default=20.0, help="divide the reference 14.2 s per call by this"
    )
    ap.add_argument("--no-docs", action="store_true", help="do not update docs/benchmarks.md")
    args = ap.parse_args()
    latency = REFERENCE_CALL_S / args.scale
    prompts_list = load_prompts(ROOT / "prompts" / "base.jsonl") + load_prompts(
        ROOT / "prompts" / "expanded.jsonl"
    )
    # The fake's tokenizer (4 characters a token) on the real prompts gives the input side;
    # the reference run's total then implies the output side.
    mean_in = sum(tokens(p.prompt) + 3 for p in prompts_list) / len(prompts_list)
    out_tokens = round(reference_tokens_per_prompt(mean_in))
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        prompts = work / "prompts.jsonl"
        prompts.write_text("".join(json.dumps(p.to_dict()) + "\n" for p in prompts_list))
        runs = [run("sequential", prompts, work, latency, out_tokens, 1)]
        for c in (8, 16):
            runs.append(run(f"concurrent{c}", prompts, work, latency, out_tokens, c))
        runs.append(run("batch", prompts, work, latency, out_tokens, 8))
    seq = runs[0]["wall_s"]
    for r in runs:
        r["speedup"] = seq / r["wall_s"]
    by = {r["mode"]: r for r in runs}
    ref = runs[1]
    table = cost_at_scale(
        ref["mean_input_tokens"], ref["mean_output_tokens"], REFERENCE_MODEL, SCALES
    )
    dups = sum(r["paid_duplicates"] for r in runs)
    # The target is judged on synchronous concurrency: the fake's batches end after one
    # call-latency, which says nothing about real batch turnaround.
    best = max(r["speedup"] for r in runs[1:] if r["mode"] != "batch")

    lines = [
        f"The real collector against the loopback fake API, {len(prompts_list)} prompts "
        f"(`prompts/base.jsonl` + `prompts/expanded.jsonl`), {latency:.2f} s per call "
        f"(the reference run's {REFERENCE_CALL_S} s / {args.scale:g}). Sequential at full latency would take "
        f"{len(prompts_list) * REFERENCE_CALL_S / 60:.1f} min (the reference run: 24m40s).",
        "",
        f"| Mode | Wall time | vs sequential | Scaled x{args.scale:g} (14.2 s/call) | Paid duplicates | Peak in flight |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for r in runs:
        name = {
            "sequential": "sequential (--concurrency 1)",
            "batch": "--batch (Message Batches)",
        }.get(r["mode"], f"--concurrency {r['concurrency']}")
        scaled = (
            f"{r['wall_s'] * args.scale / 60:.1f} min"
            if r["mode"] != "batch"
            else "minutes to hours"
        )
        peak = r["peak_in_flight"] if r["mode"] != "batch" else "-"
        lines.append(
            f"| {name} | {r['wall_s']:.1f} s | {r['speedup']:.1f}x | {scaled} "
            f"| {r['paid_duplicates']} | {peak} |"
        )
    lines += [
        "",
        f"Target: >= 12x faster than sequential with 0 paid duplicates. Best synchronous: {best:.1f}x "
        f"({'met' if best >= 12 and dups == 0 else 'NOT met'}), "
        f"{dups} paid duplicates in all runs. With the default `--concurrency 8` the ceiling is 8x "
        "(ceil(104/8) = 13 rounds of one call each), so 12x needs `--concurrency 16` (7 rounds, 14.9x at best), "
        "where the account's rate limit allows it (the collector lowers concurrency on 429s). "
        "The fake ends a batch one call-latency after submission; real batches take minutes to hours.",
        "",
        f"Cost at scale from the measured mean usage per prompt ({ref['mean_input_tokens']:.0f} input + "
        f"{ref['mean_output_tokens']:.0f} output tokens, {REFERENCE_MODEL} at $3/$15 per million; the fake's answers "
        "are sized so that 104 of them cost what the reference run paid, since it recorded only its $1.61 total):",
        "",
        "| Scale | Prompts | Sync | Batch (50% off) |",
        "|---|---:|---:|---:|",
    ]
    for row in table:
        lines.append(
            f"| {row['label']} | {row['prompts']:,} | ${row['sync_usd']:,.2f} | ${row['batch_usd']:,.2f} |"
        )
    body = "\n".join(lines)
    print(body)
    if not args.no_docs:
        _benchlib.write_section(
            "collect", "Teacher collection: sequential vs concurrent vs batch", body
        )
    figures = {
        "bench": "collect",
        "prompts": len(prompts_list),
        "latency_s": round(latency, 4),
        "scale": args.scale,
        **{f"{r['mode']}_wall_s": round(r["wall_s"], 2) for r in runs},
        **{f"{r['mode']}_speedup": round(r["speedup"], 2) for r in runs},
        "paid_duplicates": dups,
        "failed": sum(r["failed"] for r in runs),
        "target_12x_met": best >= 12 and dups == 0,
        "best_sync_speedup": round(best, 2),
        "default_concurrency_speedup": round(by["concurrent8"]["speedup"], 2),
        "mean_input_tokens": round(ref["mean_input_tokens"], 1),
        "mean_output_tokens": round(ref["mean_output_tokens"], 1),
        "cost_at_scale": [
            {k: (round(v, 2) if isinstance(v, float) else v) for k, v in row.items()}
            for row in table
        ],
    }
    _benchlib.emit(figures)


if __name__ == "__main__":
    main()
