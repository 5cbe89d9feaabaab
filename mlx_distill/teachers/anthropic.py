"""Claude as the teacher (and the judge's client): ``AsyncAnthropic`` with our own retry policy.

Why not the SDK's retries alone (FACTS): its default ``max_retries=2`` loses
prompts under sustained 429/529s, it would retry a 429 for
``enforced_spend_limit_reached``, and its sleeps hide 429s from the concurrency
limiter. So the client is built with ``max_retries=0`` and :meth:`call` does it:

* 429: every new attempt waits for ``retry-after`` (or the ``anthropic-ratelimit-*-reset``
  time, or a backoff), and the concurrency limit halves (at most once a second);
  it grows back by one after ``limit`` successes in a row (AIMD);
* 408/409/5xx/529 and dropped connections or timeouts: exponential backoff with
  jitter, ``backoff_s * 2**(n-1)`` capped at ``backoff_max_s``, for at most
  ``max_attempts`` tries (defaults 1 s, 60 s, 8: at most ~2 minutes per prompt);
* 401/403 (key), 404 (model) and 429 ``enforced_spend_limit_reached``: never
  retried; in-flight requests end, then :class:`TeacherFatal`/ConfigError stops the run;
* other 4xx (a bad request): that prompt fails, the run goes on.

Errors are told apart by ``status_code`` on ``APIStatusError`` (class names move
between SDK versions). Nothing here prints or stores the key or request headers.
"""

from __future__ import annotations

import asyncio
import os
import random
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, TypeVar

from mlx_distill.errors import ConfigError
from mlx_distill.pricing import estimate_tokens
from mlx_distill.teachers import (
    Admit,
    Failure,
    OnResult,
    Reply,
    Request,
    Teacher,
    TeacherFatal,
    usage_dict,
)
from mlx_distill.teachers.ratelimit import (
    MAX_WAIT_S,
    AdaptiveLimiter,
    is_spend_limit,
    parse_retry_after,
    ratelimit_wait,
)

__all__ = ["MAX_WAIT_S", "AdaptiveLimiter", "AnthropicTeacher", "cacheable", "is_spend_limit", "parse_retry_after",
           "ratelimit_wait"]

T = TypeVar("T")

KEY_HELP = (
    "export ANTHROPIC_API_KEY=sk-ant-...   (create one at https://console.anthropic.com/settings/keys), "
    "or use an offline teacher: --teacher demo / --teacher local:PATH"
)
# Claude models read 200k tokens; at >= 4 characters per token a prompt over
# 4 * (200,000 - max_tokens) characters cannot fit, whatever it contains.
CONTEXT_TOKENS = 200_000
MIN_CHARS_PER_TOKEN = 4.0
# Prompt caching needs a prefix of at least 1,024 tokens (2,048 on Sonnet 4.6, 4,096 on
# Haiku 4.5); shorter system prompts are sent without cache_control.
CACHE_MIN_TOKENS = 1024


def _sdk() -> Any:
    try:
        import anthropic
    except ImportError:  # pragma: no cover - a declared dependency
        raise ConfigError(
            "the anthropic SDK is not installed: pip install 'anthropic>=2.14'"
        ) from None
    return anthropic


class _GiveUp(Exception):
    def __init__(self, failure: Failure):
        super().__init__(failure.error)
        self.failure = failure


class AnthropicTeacher(Teacher):
    """``anthropic:MODEL``: concurrent Messages API calls (``run``) or Message Batches."""

    OPTIONS = (
        "concurrency",
        "max_attempts",
        "backoff_s",
        "backoff_max_s",
        "timeout_s",
        "api_key",
        "base_url",
        "client",
        "log",
        "sleep",
    )
    paid = True
    default_max_tokens = 2048
    # API version 2026-10-21 (sent by SDK 2.x) rejects temperature/top_p/top_k with a 400,
    # even at their default values, and the SDK no longer has the parameters.
    sampling = False

    def __init__(
        self,
        model: str,
        *,
        concurrency: int = 8,
        max_attempts: int = 8,
        backoff_s: float = 1.0,
        backoff_max_s: float = 60.0,
        timeout_s: float = 600.0,
        api_key: str | None = None,
        base_url: str | None = None,
        client: Any = None,
        log: Callable[[str], None] | None = None,
        sleep: Callable[[float], Awaitable[Any]] | None = None,
    ):
        if concurrency < 1 or max_attempts < 1:
            raise ConfigError(
                f"--concurrency and --max-attempts must be >= 1, got {concurrency}, {max_attempts}"
            )
        self.model = model
        self.spec = f"anthropic:{model}"
        self.concurrency = int(concurrency)
        self.max_attempts = int(max_attempts)
        self.backoff_s = backoff_s
        self.backoff_max_s = backoff_max_s
        self.timeout_s = timeout_s
        self._api_key = api_key
        self._base_url = base_url
        self._client = (
            client  # injected (judge tests); otherwise one per run, inside its event loop
        )
        self.log = log or (lambda _msg: None)
        self.sleep = sleep or asyncio.sleep
        self.limiter: AdaptiveLimiter | None = None
        self._fatal: Exception | None = None

    # ---- set-up -------------------------------------------------------------------------------
    def api_key(self) -> str:
        key = (
            self._api_key
            or os.environ.get("ANTHROPIC_API_KEY")
            or os.environ.get("ANTHROPIC_AUTH_TOKEN")
        )
        if not key or not key.strip():
            raise ConfigError(
                f"no Anthropic API key: ANTHROPIC_API_KEY is not set.\n  fix: {KEY_HELP}"
            )
        return key.strip()

    def check_ready(self) -> None:
        if self._client is None:
            self.api_key()

    def make_client(self) -> Any:
        """An ``AsyncAnthropic`` (honours ``base_url`` / ``ANTHROPIC_BASE_URL``), SDK retries off."""
        sdk = _sdk()
        return sdk.AsyncAnthropic(
            api_key=self.api_key(),
            base_url=self._base_url or None,
            max_retries=0,
            timeout=self.timeout_s,
        )

    def context_limit(self, prompt: str, system: str | None, max_tokens: int) -> str | None:
        chars = len(prompt) + len(system or "")
        limit = int(MIN_CHARS_PER_TOKEN * max(0, CONTEXT_TOKENS - max_tokens))
        if chars > limit:
            return (
                f"{chars:,} characters with the system prompt cannot fit Claude's {CONTEXT_TOKENS:,}-token "
                f"context with {max_tokens} tokens for the answer (limit ~{limit:,} characters)"
            )
        return None

    def params(self, req: Request) -> dict[str, Any]:
        """The Messages API body for ``req`` (a long system prompt is marked for caching)."""
        p: dict[str, Any] = {
            "model": self.model,
            "max_tokens": int(req.max_tokens),
            "messages": [{"role": "user", "content": req.prompt}],
        }
        if req.system:
            block: dict[str, Any] = {"type": "text", "text": req.system}
            if cacheable(req.system):
                block["cache_control"] = {"type": "ephemeral"}
            p["system"] = [block]
        if req.temperature is not None or req.top_p is not None:
            raise ConfigError(
                "Claude teachers take no temperature/top_p (API version 2026-10-21); leave them unset"
            )
        return p

    # ---- the retry policy -------------------------------------------------------------------
    def backoff(self, attempt: int) -> float:
        return min(self.backoff_max_s, self.backoff_s * 2 ** (attempt - 1)) * random.uniform(
            0.75, 1.0
        )

    def _fatal_error(self, e: Any) -> Exception:
        status = e.status_code
        what = f"HTTP {status} {getattr(e, 'type', None) or ''}: {getattr(e, 'api_message', None) or ''}".strip()
        if status in (401, 403):
            return ConfigError(
                f"Anthropic rejected the API key ({what}).\n  fix: check ANTHROPIC_API_KEY; {KEY_HELP}"
            )
        if status == 404:
            return ConfigError(
                f"Anthropic does not know model {self.model!r} ({what}).\n"
                "  fix: --teacher anthropic:claude-sonnet-4-6 (or another model id)"
            )
        return TeacherFatal(
            f"Anthropic: organisation spend limit reached ({what}); not retried.\n"
            "  fix: raise the limit in the Console, then rerun the same command to resume"
        )

    async def call(self, fn: Callable[[], Awaitable[T]], what: str = "request") -> T:
        """Run ``fn`` (one API call) under the retry policy; raises _GiveUp or a fatal error."""
        sdk = _sdk()
        attempt = 0
        while True:
            attempt += 1
            if self.limiter is not None:
                await self.limiter.wait_unpaused(self.sleep)
            if self._fatal is not None:
                raise self._fatal
            try:
                return await fn()
            except sdk.APIStatusError as e:
                status = e.status_code
                if status in (401, 403, 404) or (status == 429 and is_spend_limit(e)):
                    self._fatal = self._fatal or self._fatal_error(e)
                    raise self._fatal from None
                retryable = status in (408, 409, 429) or status >= 500
                reason = f"HTTP {status} {getattr(e, 'type', None) or ''}".strip()
                if not retryable:
                    raise _GiveUp(
                        Failure(f"{reason}: {getattr(e, 'api_message', None) or e}", status, False)
                    ) from None
                if attempt >= self.max_attempts:
                    raise _GiveUp(
                        Failure(f"{reason} after {attempt} attempts", status, True)
                    ) from None
                headers = e.response.headers
                wait = parse_retry_after(headers)
                if status == 429:
                    wait = wait if wait is not None else ratelimit_wait(headers)
                    wait = wait if wait is not None else self.backoff(attempt)
                    if self.limiter is not None:
                        before, after = self.limiter.rate_limited()
                        self.limiter.pause(wait)
                        self.log(
                            f"{what}: 429 rate limited; waiting {wait:.1f}s"
                            + (f", concurrency {before} -> {after}" if after != before else "")
                        )
                        continue
                else:
                    wait = wait if wait is not None else self.backoff(attempt)
                    self.log(
                        f"{what}: {reason}; retry {attempt}/{self.max_attempts - 1} in {wait:.1f}s"
                    )
                await self.sleep(min(wait, MAX_WAIT_S))
            except sdk.APIConnectionError as e:  # dropped connections and timeouts
                kind = "timeout" if isinstance(e, sdk.APITimeoutError) else "connection error"
                if attempt >= self.max_attempts:
                    raise _GiveUp(Failure(f"{kind} after {attempt} attempts", None, True)) from None
                wait = self.backoff(attempt)
                self.log(f"{what}: {kind}; retry {attempt}/{self.max_attempts - 1} in {wait:.1f}s")
                await self.sleep(wait)

    # ---- answering ----------------------------------------------------------------------------
    async def answer(self, client: Any, req: Request) -> Reply | Failure:
        """One request through the retry policy -> Reply or Failure (fatal errors propagate)."""
        params = self.params(req)
        started = [0.0]

        async def once() -> Any:
            started[0] = time.monotonic()
            return await client.messages.with_raw_response.create(**params)

        try:
            raw = await self.call(once, what=req.key[:12])
        except _GiveUp as g:
            return g.failure
        latency = time.monotonic() - started[0]
        msg = await raw.parse()
        if self.limiter is not None:
            await self.limiter.succeeded()
            wait = ratelimit_wait(raw.headers)
            if wait:
                self.limiter.pause(wait)
        text = "".join(
            getattr(b, "text", "") for b in msg.content if getattr(b, "type", "") == "text"
        )
        return Reply(
            text=text,
            stop_reason=str(msg.stop_reason or ""),
            usage=usage_dict(msg.usage),
            request_id=raw.headers.get("request-id") or getattr(msg, "_request_id", None),
            latency_s=round(latency, 3),
            model=str(msg.model or self.model),
        )

    async def arun(
        self, requests: Sequence[Request], on_result: OnResult, *, admit: Admit | None = None
    ) -> None:
        """``run`` inside an event loop (the judge awaits this twice in one loop)."""
        self._fatal = None
        self.limiter = AdaptiveLimiter(self.concurrency)
        own = self._client is None
        client = self.make_client() if own else self._client
        tasks: set[asyncio.Task] = set()

        async def work(req: Request) -> None:
            try:
                try:
                    outcome = await self.answer(client, req)
                except Exception as e:
                    # fatal (wrong key, spend limit): recorded in self._fatal and raised
                    # once the requests already in flight have ended
                    if self._fatal is None:
                        raise
                    outcome = Failure(str(e).splitlines()[0], None, True)
                on_result(req, outcome)
            finally:
                await self.limiter.release()

        try:
            for i, req in enumerate(requests):
                await self.limiter.acquire()
                if self._fatal is not None:
                    await self.limiter.release()
                    break
                if admit is not None and not admit(req):
                    await self.limiter.release()
                    continue
                task = asyncio.create_task(work(req))
                tasks.add(task)
                task.add_done_callback(tasks.discard)
                if i == 0 and len(requests) > 1 and req.system and cacheable(req.system):
                    # Write the shared system prompt to the cache once before fanning out:
                    # 8 concurrent first requests would each pay the 1.25x cache write.
                    await asyncio.wait({task})
            if tasks:
                await asyncio.gather(*tasks)
        finally:
            for t in tasks:
                t.cancel()
            if own:
                await client.close()
        if self._fatal is not None:
            raise self._fatal

    def run(
        self, requests: Sequence[Request], on_result: OnResult, *, admit: Admit | None = None
    ) -> None:
        if not requests:
            return
        self.check_ready()
        asyncio.run(self.arun(requests, on_result, admit=admit))


def cacheable(system: str) -> bool:
    return estimate_tokens(system) >= CACHE_MIN_TOKENS
