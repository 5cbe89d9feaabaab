"""The one price table (USD per million tokens), cost of recorded usage, estimates and cost at scale.

Every dollar figure mlx-distill prints or records comes from :func:`PriceTable.cost`
applied to the usage the API returned, so totals always equal the sum of the
recorded usage at these prices. ``--prices FILE`` (JSON or YAML) overrides or
adds models::

    batch_discount: 0.5          # Message Batches cost half
    models:
      claude-sonnet-4-6: {input: 3, output: 15, cache_write: 3.75, cache_read: 0.30}

Missing ``cache_write`` / ``cache_read`` default to 1.25x / 0.1x ``input`` (the
5-minute cache). A dated model id (``claude-sonnet-4-5-20250929``) uses the
entry of its longest matching prefix.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mlx_distill.errors import ConfigError

USAGE_FIELDS: tuple[str, ...] = (
    "input_tokens",
    "output_tokens",
    "cache_creation_input_tokens",
    "cache_read_input_tokens",
)
CACHE_WRITE_MULT = 1.25  # 5-minute cache writes (1-hour writes are 2x)
CACHE_READ_MULT = 0.10
BATCH_DISCOUNT = 0.5

# (input, output) USD per million tokens, from Anthropic's published price list.
_BASE: dict[str, tuple[float, float]] = {
    "claude-opus-4-6": (5.0, 25.0),
    "claude-opus-4-5": (5.0, 25.0),
    "claude-opus-4-1": (15.0, 75.0),
    "claude-opus-4": (15.0, 75.0),
    "claude-sonnet-4-6": (3.0, 15.0),
    "claude-sonnet-4-5": (3.0, 15.0),
    "claude-sonnet-4": (3.0, 15.0),
    "claude-3-7-sonnet": (3.0, 15.0),
    "claude-haiku-4-5": (1.0, 5.0),
    "claude-3-5-haiku": (0.8, 4.0),
    "claude-3-haiku": (0.25, 1.25),
}

# The reference run: 104 prompts from claude-sonnet-4-6, sequentially, for about $1.61.
REFERENCE_PROMPTS = 104
REFERENCE_COST_USD = 1.61
REFERENCE_MODEL = "claude-sonnet-4-6"
SCALES: tuple[tuple[str, int], ...] = (
    ("Our demo", 104),
    ("Small campaign", 10_000),
    ("Medium campaign", 1_000_000),
    ("DeepSeek/MiniMax (alleged)", 16_000_000),
)


@dataclass(frozen=True)
class ModelPrice:
    input: float
    output: float
    cache_write: float
    cache_read: float

    @classmethod
    def of(
        cls,
        input: float,
        output: float,
        cache_write: float | None = None,
        cache_read: float | None = None,
    ) -> ModelPrice:
        return cls(
            input,
            output,
            input * CACHE_WRITE_MULT if cache_write is None else cache_write,
            input * CACHE_READ_MULT if cache_read is None else cache_read,
        )


def zero_usage() -> dict[str, int]:
    return dict.fromkeys(USAGE_FIELDS, 0)


def add_usage(total: dict[str, int], usage: dict[str, Any]) -> dict[str, int]:
    """Add ``usage``'s four token fields into ``total`` (in place) and return it."""
    for k in USAGE_FIELDS:
        total[k] = total.get(k, 0) + int(usage.get(k) or 0)
    return total


class PriceTable:
    """Per-model prices plus the batch discount."""

    def __init__(
        self, models: dict[str, ModelPrice] | None = None, batch_discount: float = BATCH_DISCOUNT
    ):
        self.models = (
            dict(models) if models is not None else {k: ModelPrice.of(*v) for k, v in _BASE.items()}
        )
        self.batch_discount = batch_discount

    def price(self, model: str) -> ModelPrice:
        """The entry for ``model`` (exact, else the longest ``prefix-`` match); ConfigError if unknown."""
        name = model.split(":", 1)[1] if model.startswith("anthropic:") else model
        if name in self.models:
            return self.models[name]
        matches = [k for k in self.models if name.startswith(k + "-")]
        if matches:
            return self.models[max(matches, key=len)]
        raise ConfigError(
            f"no price for model {name!r} (known: {', '.join(sorted(self.models))}).\n"
            f"  fix: pass --prices FILE with  models: {{{name}: {{input: USD_PER_MTOK, output: USD_PER_MTOK}}}}"
        )

    def cost(self, model: str, usage: dict[str, Any], batch: bool = False) -> float:
        """USD for one reply's usage (all four token fields), with the batch discount if ``batch``."""
        p = self.price(model)
        usd = (
            int(usage.get("input_tokens") or 0) * p.input
            + int(usage.get("output_tokens") or 0) * p.output
            + int(usage.get("cache_creation_input_tokens") or 0) * p.cache_write
            + int(usage.get("cache_read_input_tokens") or 0) * p.cache_read
        ) / 1e6
        return usd * (self.batch_discount if batch else 1.0)


def load_prices(path: str | Path | None = None) -> PriceTable:
    """The built-in table, overridden by ``path`` (JSON or YAML) when given."""
    table = PriceTable()
    if path is None:
        return table
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"--prices {p}: no such file")
    text = p.read_text(encoding="utf-8")
    try:
        if p.suffix.lower() == ".json":
            data = json.loads(text)
        else:
            import yaml

            data = yaml.safe_load(text)
    except Exception as e:  # json.JSONDecodeError, yaml.YAMLError: both name the line
        raise ConfigError(f"--prices {p}: cannot parse ({e})") from None
    example = "models: {claude-sonnet-4-6: {input: 3, output: 15}}"
    if not isinstance(data, dict):
        raise ConfigError(f"--prices {p}: expected a mapping like  {example}")
    unknown = set(data) - {"models", "batch_discount"}
    if unknown:
        raise ConfigError(
            f"--prices {p}: unknown key(s) {sorted(unknown)}; expected 'models' and 'batch_discount'"
        )
    if "batch_discount" in data:
        bd = data["batch_discount"]
        if isinstance(bd, bool) or not isinstance(bd, (int, float)) or not 0 < bd <= 1:
            raise ConfigError(
                f"--prices {p}: batch_discount must be a number in (0, 1], got {bd!r}"
            )
        table.batch_discount = float(bd)
    models = data.get("models") or {}
    if not isinstance(models, dict):
        raise ConfigError(f"--prices {p}: 'models' must be a mapping like  {example}")
    for name, entry in models.items():
        fields = ("input", "output", "cache_write", "cache_read")
        if (
            not isinstance(entry, dict)
            or not {"input", "output"} <= set(entry)
            or set(entry) - set(fields)
        ):
            raise ConfigError(
                f"--prices {p}: model {name!r} needs input and output (and optionally cache_write, "
                f"cache_read) in USD per million tokens, got {entry!r}"
            )
        for k, v in entry.items():
            if isinstance(v, bool) or not isinstance(v, (int, float)) or v < 0:
                raise ConfigError(f"--prices {p}: {name}.{k} must be a number >= 0, got {v!r}")
        table.models[str(name)] = ModelPrice.of(**{k: float(v) for k, v in entry.items()})
    return table


# ---- token estimates (no tokenizer call: these run before anything is sent) ----------------

# Claude's tokenizer averages about 3.5 characters per token on English and code
# (a 1,400-character prompt is ~400 tokens). Estimates for --dry-run use that.
CHARS_PER_TOKEN = 3.5
# Each message carries a few template tokens (role markers): counted per request.
MESSAGE_OVERHEAD_TOKENS = 8


def estimate_tokens(text: str | None) -> int:
    """Typical token count of ``text`` for a Claude model (characters / 3.5, rounded up)."""
    return math.ceil(len(text) / CHARS_PER_TOKEN) if text else 0


def max_tokens_of(text: str | None) -> int:
    """An upper bound: a byte-level BPE token covers at least one UTF-8 byte."""
    return len(text.encode("utf-8")) if text else 0


def worst_case_cost(
    prices: PriceTable,
    model: str,
    prompt: str,
    system: str | None,
    max_tokens: int,
    batch: bool = False,
) -> float:
    """The most one request can cost: every input byte a token at the dearest input rate
    (cache writes cost 1.25x), and the answer running to ``max_tokens``. ``--budget``
    reserves this before a request is sent, so the budget cannot be overshot."""
    p = prices.price(model)
    n_in = max_tokens_of(prompt) + max_tokens_of(system) + MESSAGE_OVERHEAD_TOKENS
    usd = (n_in * max(p.input, p.cache_write) + max_tokens * p.output) / 1e6
    return usd * (prices.batch_discount if batch else 1.0)


def cost_at_scale(
    mean_input_tokens: float,
    mean_output_tokens: float,
    model: str = REFERENCE_MODEL,
    scales: tuple[tuple[str, int], ...] | list[tuple[str, int]] | list[int] = SCALES,
    prices: PriceTable | None = None,
) -> list[dict[str, Any]]:
    """Rows ``{label, prompts, sync_usd, batch_usd}``: what collecting N prompts costs with
    the given mean tokens per prompt (uncached input), synchronously and through batches.

    Example: 80 input + 1,016 output tokens at Sonnet 4.6 ($3/$15) is $0.01548 a prompt,
    so 104 prompts cost $1.61 (the reference run) and 10,000 cost $155.
    """
    table = prices or PriceTable()
    usage = {"input_tokens": mean_input_tokens, "output_tokens": mean_output_tokens}
    p = table.price(model)
    per_prompt = (usage["input_tokens"] * p.input + usage["output_tokens"] * p.output) / 1e6
    rows = []
    for item in scales:
        label, n = item if isinstance(item, tuple) else (f"{item:,} prompts", item)
        rows.append(
            {
                "label": label,
                "prompts": int(n),
                "sync_usd": per_prompt * n,
                "batch_usd": per_prompt * n * table.batch_discount,
            }
        )
    return rows


def reference_tokens_per_prompt(
    mean_input_tokens: float, prices: PriceTable | None = None
) -> float:
    """The reference run recorded only its total ($1.61 for 104 prompts on Sonnet 4.6), not its
    tokens. Given the mean input tokens of the prompts, this is the mean output it implies."""
    p = (prices or PriceTable()).price(REFERENCE_MODEL)
    per_prompt = REFERENCE_COST_USD / REFERENCE_PROMPTS
    return max(0.0, (per_prompt * 1e6 - mean_input_tokens * p.input) / p.output)


class Budget:
    """``--budget USD``: a request is admitted only if what is spent, plus the worst case of
    every request still in flight, plus its own worst case stays within the limit; each
    reservation is replaced by the actual cost when the answer arrives. So the budget is
    never exceeded, and the run stops early by at most the in-flight reservations
    (8 requests x ~$0.03 at Sonnet 4.6 with 2,048 max tokens ~ $0.25)."""

    def __init__(
        self, limit_usd: float | None, prices: PriceTable, model: str, batch: bool = False
    ):
        if limit_usd is not None and limit_usd <= 0:
            raise ConfigError(f"--budget must be > 0 USD, got {limit_usd}")
        self.limit = limit_usd
        self.prices = prices
        self.model = model
        self.batch = batch
        self.spent = 0.0
        self.refused = 0
        self._reserved: dict[str, float] = {}

    def admit(self, key: str, prompt: str, system: str | None, max_tokens: int) -> bool:
        if self.limit is None:
            return True
        worst = worst_case_cost(self.prices, self.model, prompt, system, max_tokens, self.batch)
        if self.spent + sum(self._reserved.values()) + worst > self.limit:
            self.refused += 1
            return False
        self._reserved[key] = worst
        return True

    def settle(self, key: str, cost_usd: float) -> None:
        """Replace ``key``'s reservation by what it cost (0 for a failure)."""
        self._reserved.pop(key, None)
        self.spent += cost_usd
