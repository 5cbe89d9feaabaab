"""A loopback fake of the Anthropic Messages + Message Batches API, with fault injection.

Tests (and ``scripts/bench_collect.py``) point the real ``anthropic`` SDK at it
through ``base_url`` / ``ANTHROPIC_BASE_URL``. It checks what the real API
checks that matters here (the key, as ``Authorization: Bearer`` or
``X-Api-Key``; the ``anthropic-version`` header), answers in
``application/json``, gives batches an absolute ``results_url``, counts every
request per prompt (arrivals and paid 200s) and the peak number in flight, and
applies scripted faults:

* ``Fault("429", retry_after=0.2)``: rate limited, with ``retry-after``;
* ``Fault("spend_limit")``: 429 ``enforced_spend_limit_reached`` (must not be retried);
* ``Fault("529")``, ``Fault("500")``: overloaded / internal error;
* ``Fault("drop")``: close the connection without an answer;
* ``Fault("slow", delay=1.0)``: answer, but late;
* ``Fault("401")``: authentication error; ``Fault("400")``: invalid request (not retryable);
* ``Fault("ratelimit", reset_s=0.3)``: a normal answer whose ``anthropic-ratelimit-*``
  headers say no requests remain until ``reset_s`` from now.

Like API version 2026-10-21, it rejects ``temperature``/``top_p``/``top_k`` with a 400.

``match`` limits a fault to requests whose user text contains it; ``times``
is how many requests it hits. Batch items take ``batch_faults``: user-text
substring -> ``"errored"`` / ``"expired"`` / ``"canceled"`` (once each).
``responder(body) -> str`` scripts the reply text (the judge tests use it).
"""

from __future__ import annotations

import json
import math
import random
import socket
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

TEST_KEY = "sk-ant-api03-FAKE-test-key-0123456789abcdef"


@dataclass
class Fault:
    kind: str  # 429 | spend_limit | 529 | 500 | drop | slow | 401 | 400 | ratelimit
    times: int = 1
    match: str | None = None
    retry_after: float | None = None
    delay: float = 0.0
    reset_s: float = 0.3


def tokens(text: str) -> int:
    """The fake's tokenizer: 4 characters per token, rounded up."""
    return math.ceil(len(text) / 4) if text else 0


def _now_iso(offset_s: float = 0.0) -> str:
    return (
        (datetime.now(timezone.utc) + timedelta(seconds=offset_s))
        .isoformat()
        .replace("+00:00", "Z")
    )


def user_text(body: dict[str, Any]) -> str:
    """The text of the last user message of a request body."""
    msgs = body.get("messages") or [{}]
    content = msgs[-1].get("content", "")
    if isinstance(content, list):
        return "".join(b.get("text", "") for b in content if isinstance(b, dict))
    return str(content)


def system_text(body: dict[str, Any]) -> str:
    system = body.get("system") or ""
    if isinstance(system, list):
        return "".join(b.get("text", "") for b in system if isinstance(b, dict))
    return str(system)


def sampling_error(body: dict[str, Any]) -> str | None:
    """API version 2026-10-21 rejects sampling parameters, even at their defaults."""
    for k in ("temperature", "top_p", "top_k"):
        if k in body:
            return f"{k}: Extra inputs are not permitted"
    return None


def default_responder(body: dict[str, Any]) -> str:
    prompt = user_text(body)
    return (
        "## Overview\n\nA short answer.\n\n```python\ndef solve() -> None:\n"
        f'    """Solve: {prompt[:60]}"""\n    raise NotImplementedError\n```\n'
    )


@dataclass
class FakeAnthropic:
    key: str = TEST_KEY
    latency: float = 0.0
    batch_latency: float = 0.0
    responder: Callable[[dict[str, Any]], str] = default_responder
    cache_min_tokens: int = 0
    faults: list[Fault] = field(default_factory=list)
    batch_faults: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.lock = threading.Lock()
        self.arrivals: Counter[str] = Counter()  # user text -> requests received
        self.paid: Counter[str] = Counter()  # user text -> 200 answers sent (sync + batch)
        self.bodies: list[dict[str, Any]] = []  # every /v1/messages body that got an answer
        self.status_counts: Counter[int] = Counter()
        self.in_flight = 0
        self.max_in_flight = 0
        self.batches: dict[str, dict[str, Any]] = {}
        self.batch_creates = 0
        self.seen_headers: list[dict[str, str]] = []
        self.arrival_log: list[tuple[float, str]] = []  # (time.monotonic(), user text)
        self._cached_systems: set[str] = set()
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    # ---- lifecycle -------------------------------------------------------------------------
    def start(self) -> str:
        fake = self

        class Handler(_Handler):
            server_fake = fake

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self._server.request_queue_size = 256
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()
        return self.base_url

    @property
    def base_url(self) -> str:
        assert self._server is not None
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    def __enter__(self) -> FakeAnthropic:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # ---- helpers for tests -----------------------------------------------------------------
    def duplicates(self) -> int:
        """Paid answers beyond the first for each prompt."""
        return sum(n - 1 for n in self.paid.values() if n > 1)

    def take_fault(self, text: str) -> Fault | None:
        with self.lock:
            for f in self.faults:
                if f.times > 0 and (f.match is None or f.match in text):
                    f.times -= 1
                    return f
        return None

    def message(self, body: dict[str, Any]) -> dict[str, Any]:
        """Build a Messages API reply for ``body`` (and count it as paid)."""
        text = self.responder(body)
        max_tokens = int(body.get("max_tokens", 1024))
        out = tokens(text)
        stop = "end_turn"
        if out > max_tokens:
            text, out, stop = text[: max_tokens * 4], max_tokens, "max_tokens"
        system = body.get("system")
        sys_text = system_text(body)
        cacheable = isinstance(system, list) and any(
            isinstance(b, dict) and b.get("cache_control") for b in system
        )
        usage = {
            "input_tokens": tokens(user_text(body)) + 3,
            "output_tokens": out,
            "cache_creation_input_tokens": 0,
            "cache_read_input_tokens": 0,
        }
        with self.lock:
            if cacheable and tokens(sys_text) >= self.cache_min_tokens:
                if sys_text in self._cached_systems:
                    usage["cache_read_input_tokens"] = tokens(sys_text)
                else:
                    usage["cache_creation_input_tokens"] = tokens(sys_text)
                    self._cached_systems.add(sys_text)
            else:
                usage["input_tokens"] += tokens(sys_text)
            self.paid[user_text(body)] += 1
            self.bodies.append(body)
        return {
            "id": f"msg_{uuid.uuid4().hex[:24]}",
            "type": "message",
            "role": "assistant",
            "model": body.get("model", "claude-fake"),
            "content": [{"type": "text", "text": text}],
            "stop_reason": stop,
            "stop_sequence": None,
            "usage": usage,
        }

    def batch_object(self, b: dict[str, Any]) -> dict[str, Any]:
        ended = time.monotonic() >= b["ends_at"]
        if ended and b["results"] is None:
            self._process_batch(b)
        counts = {"processing": 0, "succeeded": 0, "errored": 0, "canceled": 0, "expired": 0}
        if ended:
            for r in b["results"]:
                counts[r["result"]["type"]] += 1
        else:
            counts["processing"] = len(b["requests"])
        return {
            "id": b["id"],
            "type": "message_batch",
            "processing_status": "ended" if ended else "in_progress",
            "request_counts": counts,
            "created_at": b["created_at"],
            "expires_at": b["expires_at"],
            "ended_at": _now_iso() if ended else None,
            "archived_at": None,
            "cancel_initiated_at": None,
            "results_url": f"{self.base_url}/v1/messages/batches/{b['id']}/results"
            if ended
            else None,
        }

    def _process_batch(self, b: dict[str, Any]) -> None:
        results = []
        for req in b["requests"]:
            text = user_text(req["params"])
            kind = None
            with self.lock:
                for sub, k in list(self.batch_faults.items()):
                    if sub in text:
                        kind = k
                        del self.batch_faults[sub]
                        break
            if sampling_error(req["params"]):
                res = {
                    "type": "errored",
                    "error": {
                        "type": "error",
                        "error": {
                            "type": "invalid_request_error",
                            "message": sampling_error(req["params"]),
                        },
                    },
                }
            elif kind == "errored":
                res = {
                    "type": "errored",
                    "error": {
                        "type": "error",
                        "error": {"type": "overloaded_error", "message": "Overloaded"},
                    },
                }
            elif kind in ("expired", "canceled"):
                res = {"type": kind}
            else:
                res = {"type": "succeeded", "message": self.message(req["params"])}
            results.append({"custom_id": req["custom_id"], "result": res})
        random.Random(0).shuffle(results)  # results arrive unordered: match on custom_id
        b["results"] = results


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_fake: FakeAnthropic

    def log_message(self, *args: Any) -> None:  # quiet
        pass

    def _send(
        self,
        status: int,
        obj: Any,
        headers: dict[str, str] | None = None,
        ctype: str = "application/json",
    ) -> None:
        data = obj if isinstance(obj, bytes) else json.dumps(obj).encode()
        self.send_response(status)
        self.send_header("content-type", ctype)
        self.send_header("content-length", str(len(data)))
        self.send_header("request-id", f"req_{uuid.uuid4().hex[:20]}")
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.end_headers()
        self.wfile.write(data)
        with self.server_fake.lock:
            self.server_fake.status_counts[status] += 1

    def _error(
        self,
        status: int,
        etype: str,
        message: str,
        headers: dict[str, str] | None = None,
        details: dict[str, Any] | None = None,
    ) -> None:
        err: dict[str, Any] = {"type": etype, "message": message}
        if details:
            err["details"] = details
        self._send(status, {"type": "error", "error": err}, headers)

    def _authorized(self) -> bool:
        fake = self.server_fake
        auth = self.headers.get("authorization", "")
        key = auth[7:] if auth.lower().startswith("bearer ") else self.headers.get("x-api-key", "")
        with fake.lock:
            fake.seen_headers.append({k.lower(): v for k, v in self.headers.items()})
        if key != fake.key:
            self._error(401, "authentication_error", "invalid x-api-key")
            return False
        if not self.headers.get("anthropic-version"):
            self._error(400, "invalid_request_error", "anthropic-version header is required")
            return False
        return True

    def _body(self) -> dict[str, Any]:
        n = int(self.headers.get("content-length") or 0)
        return json.loads(self.rfile.read(n) or b"{}")

    def do_POST(self) -> None:  # noqa: N802
        body = self._body()
        if not self._authorized():
            return
        if self.path.rstrip("/") == "/v1/messages":
            return self._messages(body)
        if self.path.rstrip("/") == "/v1/messages/batches":
            return self._create_batch(body)
        self._error(404, "not_found_error", f"no route {self.path}")

    def do_GET(self) -> None:  # noqa: N802
        if not self._authorized():
            return
        fake = self.server_fake
        parts = self.path.split("?")[0].strip("/").split("/")
        if parts[:3] == ["v1", "messages", "batches"] and len(parts) >= 4:
            b = fake.batches.get(parts[3])
            if b is None:
                return self._error(404, "not_found_error", f"no batch {parts[3]}")
            if len(parts) == 5 and parts[4] == "results":
                obj = fake.batch_object(b)
                if obj["processing_status"] != "ended":
                    return self._error(400, "invalid_request_error", "batch still processing")
                lines = "".join(json.dumps(r) + "\n" for r in b["results"]).encode()
                return self._send(200, lines, ctype="application/binary")
            return self._send(200, fake.batch_object(b))
        self._error(404, "not_found_error", f"no route {self.path}")

    def _messages(self, body: dict[str, Any]) -> None:
        fake = self.server_fake
        text = user_text(body)
        bad = sampling_error(body)
        if bad:
            return self._error(400, "invalid_request_error", bad)
        with fake.lock:
            fake.arrivals[text] += 1
            fake.arrival_log.append((time.monotonic(), text))
            fake.in_flight += 1
            fake.max_in_flight = max(fake.max_in_flight, fake.in_flight)
        try:
            fault = fake.take_fault(text)
            kind = fault.kind if fault else None
            if kind == "drop":
                self.close_connection = True
                self.connection.shutdown(socket.SHUT_RDWR)
                return
            if kind in ("429", "spend_limit"):
                headers = {}
                if fault.retry_after is not None:
                    headers["retry-after"] = f"{fault.retry_after:g}"
                if kind == "spend_limit":
                    return self._error(
                        429,
                        "rate_limit_error",
                        "You have reached your spend limit.",
                        headers,
                        {"error_code": "enforced_spend_limit_reached"},
                    )
                return self._error(
                    429,
                    "rate_limit_error",
                    "Number of requests has exceeded your rate limit",
                    headers,
                )
            if kind == "529":
                return self._error(529, "overloaded_error", "Overloaded")
            if kind == "500":
                return self._error(500, "api_error", "Internal server error")
            if kind == "401":
                return self._error(401, "authentication_error", "invalid x-api-key")
            if kind == "400":
                return self._error(400, "invalid_request_error", "prompt is too long")
            delay = fake.latency + (fault.delay if kind == "slow" else 0.0)
            if delay:
                time.sleep(delay)
            headers = {
                "anthropic-ratelimit-requests-limit": "50",
                "anthropic-ratelimit-requests-remaining": "0" if kind == "ratelimit" else "49",
                "anthropic-ratelimit-requests-reset": _now_iso(
                    fault.reset_s if kind == "ratelimit" else 1
                ),
            }
            self._send(200, fake.message(body), headers)
        finally:
            with fake.lock:
                fake.in_flight -= 1

    def _create_batch(self, body: dict[str, Any]) -> None:
        fake = self.server_fake
        reqs = body.get("requests") or []
        ids = [r.get("custom_id") for r in reqs]
        if not reqs or len(set(ids)) != len(ids):
            return self._error(
                400, "invalid_request_error", "requests must be non-empty with unique custom_id"
            )
        bid = f"msgbatch_{uuid.uuid4().hex[:24]}"
        b = {
            "id": bid,
            "requests": reqs,
            "results": None,
            "created_at": _now_iso(),
            "expires_at": _now_iso(86400),
            "ends_at": time.monotonic() + fake.batch_latency,
        }
        with fake.lock:
            fake.batches[bid] = b
            fake.batch_creates += 1
            for r in reqs:
                fake.arrivals[user_text(r["params"])] += 1
        self._send(200, fake.batch_object(b))


def main() -> None:  # pragma: no cover - manual use: python -m tests.fake_anthropic
    import argparse

    ap = argparse.ArgumentParser(description="Run the fake Anthropic API on 127.0.0.1")
    ap.add_argument("--latency", type=float, default=0.0)
    args = ap.parse_args()
    fake = FakeAnthropic(latency=args.latency)
    print(fake.start(), flush=True)
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        fake.stop()


if __name__ == "__main__":
    main()
