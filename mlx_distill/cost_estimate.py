"""``mlx-distill collect --dry-run``: the tokens and cost of the requests still to send, sent nowhere."""

from __future__ import annotations

from typing import Any

from mlx_distill.pricing import MESSAGE_OVERHEAD_TOKENS, PriceTable, estimate_tokens
from mlx_distill.prompts import Prompt
from mlx_distill.teachers import Request, Teacher

# The reference run paid $1.61 for 104 Sonnet 4.6 answers: ~1,000 output tokens each.
TYPICAL_OUTPUT_TOKENS = 1000


def estimate(
    plan: list[tuple[Prompt, Request]],
    teacher: Teacher,
    prices: PriceTable,
    batch: bool,
    done_records: list[dict[str, Any]],
) -> dict[str, Any]:
    """--dry-run: tokens and cost of the requests still to send, sent nowhere."""
    reqs = [r for _, r in plan]
    system = reqs[0].system if reqs else None
    local = not teacher.paid
    if local:
        n_in = sum(teacher.prompt_tokens(r.prompt, r.system) for r in reqs)  # type: ignore[attr-defined]
        how = "input: counted with the teacher's tokenizer"
    else:
        n_in = sum(estimate_tokens(r.prompt) + MESSAGE_OVERHEAD_TOKENS for r in reqs)
        how = "input: characters / 3.5 (Claude averages ~3.5 characters per token on English and code)"
    outs = [int((r.get("usage") or {}).get("output_tokens") or 0) for r in done_records]
    max_out = reqs[0].max_tokens if reqs else 0
    typical = round(sum(outs) / len(outs)) if outs else min(TYPICAL_OUTPUT_TOKENS, max_out)
    how += (
        "; typical output: the mean of the answers already in --out"
        if outs
        else f"; typical output: ~{TYPICAL_OUTPUT_TOKENS} tokens (the reference run's $1.61 for 104 Sonnet answers)"
    )
    sys_tokens = 0 if local or not system else estimate_tokens(system)
    from mlx_distill.teachers.anthropic import cacheable

    cached = bool(system) and not local and cacheable(system)
    est: dict[str, Any] = {
        "requests": len(reqs),
        "input_tokens": n_in,
        "system_tokens_each": sys_tokens,
        "system_cached": cached,
        "output_tokens_typical": typical * len(reqs),
        "output_tokens_max": max_out * len(reqs),
        "how": how,
        "batch": batch,
    }
    if local:
        est.update(cost_typical_usd=0.0, cost_max_usd=0.0)
        return est

    def cost(out_each: int) -> float:
        usage = {
            "input_tokens": n_in + (0 if cached else sys_tokens * len(reqs)),
            "output_tokens": out_each * len(reqs),
            "cache_creation_input_tokens": sys_tokens if cached and reqs else 0,
            "cache_read_input_tokens": sys_tokens * (len(reqs) - 1) if cached and reqs else 0,
        }
        return prices.cost(teacher.model, usage, batch)

    est.update(cost_typical_usd=cost(typical), cost_max_usd=cost(max_out))
    return est


def format_estimate(est: dict[str, Any], teacher: str) -> str:
    mode = "Message Batches (50% off)" if est["batch"] else "synchronous"
    return "\n".join(
        [
            f"dry run: {est['requests']} request(s) to {teacher}, {mode}"
            + (f" ({est['skipped']} prompt(s) already in --out)" if est.get("skipped") else "")
            + "; nothing sent",
            f"  input ~{est['input_tokens']:,} tokens"
            + (
                f" + system ~{est['system_tokens_each']:,} tokens each ({'cached' if est['system_cached'] else 'not cached'})"
                if est["system_tokens_each"]
                else ""
            ),
            f"  output ~{est['output_tokens_typical']:,} tokens typical, at most {est['output_tokens_max']:,}",
            f"  cost ~${est['cost_typical_usd']:.4f} typical, at most ${est['cost_max_usd']:.4f}",
            f"  ({est['how']})",
        ]
    )
