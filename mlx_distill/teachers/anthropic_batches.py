"""``collect --batch``: the Message Batches API (50% off, results within 24 h).

* Requests go out in chunks within the API's limits: 100,000 requests or 256 MB
  of JSON per batch (104 prompts at ~1 KB are one batch of ~100 KB).
* Each batch id is written to a state file next to the output the moment the
  API returns it, so a killed run resumes polling those batches instead of
  paying for them again. (A kill in the milliseconds between the API's answer
  and that write is the one window where a batch can be orphaned.)
* Results arrive unordered and are matched on ``custom_id`` (the record key).
* ``errored`` (server-side), ``expired`` and ``canceled`` items are resubmitted,
  up to ``rounds`` submissions per prompt; an ``invalid_request_error`` is not.
* Replies carry ``batch_id``, so the collector prices them with the batch discount.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable, Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from mlx_distill.errors import ConfigError, DataError, DistillError
from mlx_distill.files import write_json_atomic
from mlx_distill.teachers import Admit, Failure, OnResult, Reply, Request, usage_dict
from mlx_distill.teachers.anthropic import AdaptiveLimiter, AnthropicTeacher, _GiveUp

MAX_REQUESTS = 100_000
MAX_BYTES = 256 * 1024 * 1024 - 1024 * 1024  # 256 MB, less 1 MB for the envelope


class BatchState:
    """The ``<out>.batches.json`` file: every batch submitted for this output, and whether
    its results have been written."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.batches: list[dict[str, Any]] = []
        if self.path.exists():
            try:
                data = json.loads(self.path.read_text(encoding="utf-8"))
                self.batches = list(data["batches"])
            except (ValueError, KeyError, TypeError) as e:
                raise DataError(
                    f"unreadable batch state ({e})",
                    self.path,
                    fix="it lists submitted batch ids; restore it, or delete it to resubmit "
                    "(the unfinished batches would then be paid twice)",
                ) from None

    def save(self) -> None:
        write_json_atomic(self.path, {"version": 1, "batches": self.batches})

    def pending(self) -> list[dict[str, Any]]:
        return [b for b in self.batches if not b.get("collected")]

    def check_belongs(self, known_keys: set[str]) -> None:
        """Refuse unfinished batches that were submitted for other prompts or settings."""
        for b in self.pending():
            stray = [c for c in b["custom_ids"] if c not in known_keys]
            if stray:
                raise ConfigError(
                    f"{self.path} lists batch {b['id']} ({len(b['custom_ids'])} requests, still to collect) "
                    f"made from other prompts or settings ({len(stray)} of its keys match nothing in this run).\n"
                    "  fix: rerun with the same --prompts/--teacher/--system/--max-tokens/--temperature "
                    "to collect it, or use another --out"
                )


def chunk(
    entries: Sequence[tuple[Request, dict[str, Any]]],
    max_requests: int = MAX_REQUESTS,
    max_bytes: int = MAX_BYTES,
) -> list[list[tuple[Request, dict[str, Any]]]]:
    """Split ``(request, batch entry)`` pairs so each chunk is within both limits."""
    chunks: list[list[tuple[Request, dict[str, Any]]]] = []
    cur: list[tuple[Request, dict[str, Any]]] = []
    size = 0
    for req, entry in entries:
        n = len(json.dumps(entry).encode("utf-8")) + 1
        if n > max_bytes:
            raise ConfigError(
                f"prompt {req.key} alone is {n:,} bytes, over the batch limit of {max_bytes:,}"
            )
        if cur and (len(cur) >= max_requests or size + n > max_bytes):
            chunks.append(cur)
            cur, size = [], 0
        cur.append((req, entry))
        size += n
    if cur:
        chunks.append(cur)
    return chunks


def _seconds_between(start: Any, end: Any) -> float:
    try:
        a = (
            start
            if isinstance(start, datetime)
            else datetime.fromisoformat(str(start).replace("Z", "+00:00"))
        )
        b = (
            end
            if isinstance(end, datetime)
            else datetime.fromisoformat(str(end).replace("Z", "+00:00"))
        )
        return max(0.0, (b - a).total_seconds())
    except (TypeError, ValueError):
        return 0.0


class BatchRunner:
    def __init__(
        self,
        teacher: AnthropicTeacher,
        state_path: str | Path,
        *,
        rounds: int = 3,
        poll_min_s: float = 1.0,
        poll_max_s: float = 60.0,
        max_requests: int = MAX_REQUESTS,
        max_bytes: int = MAX_BYTES,
        status: Callable[[str], None] | None = None,
    ):
        self.teacher = teacher
        self.state = BatchState(state_path)
        self.rounds = max(1, rounds)
        self.poll_min_s = min(poll_min_s, poll_max_s)
        self.poll_max_s = poll_max_s
        self.max_requests = max_requests
        self.max_bytes = max_bytes
        self.status = status or (lambda _m: None)
        self.submitted = 0  # new batches created by this run

    def run(
        self,
        requests: Sequence[Request],
        on_result: OnResult,
        *,
        done_keys: set[str] = frozenset(),
        admit: Admit | None = None,
    ) -> None:
        """Collect unfinished saved batches, then submit what is left (resubmitting failed items)."""
        self.state.check_belongs({r.key for r in requests} | set(done_keys))
        pending_saved = self.state.pending()
        if not requests and not pending_saved:
            return
        self.teacher.check_ready()
        asyncio.run(self._run(requests, on_result, set(done_keys), admit))

    async def _run(
        self, requests: Sequence[Request], on_result: OnResult, done: set[str], admit: Admit | None
    ) -> None:
        t = self.teacher
        t.limiter = AdaptiveLimiter(t.concurrency)
        client = t.make_client() if t._client is None else t._client
        by_key = {r.key: r for r in requests}
        tries: dict[str, int] = {}
        answered: set[str] = set(done)
        try:
            # 1) batches a killed run left behind: poll and collect, never resubmit
            admitted: set[str] = set()
            for b in self.state.pending():
                for k in b["custom_ids"]:
                    tries[k] = tries.get(k, 0) + 1
                    admitted.add(k)
            await self._collect_all(client, self.state.pending(), by_key, answered, on_result)
            # 2) submit what is still unanswered, in rounds (errored/expired items come back)
            for _ in range(self.rounds):
                todo = []
                for r in requests:
                    if r.key in answered or tries.get(r.key, 0) >= self.rounds:
                        continue
                    if r.key not in admitted:
                        if admit is not None and not admit(r):
                            continue
                        admitted.add(r.key)
                    todo.append(r)
                if not todo:
                    break
                new = []
                for part in chunk(
                    [(r, {"custom_id": r.key, "params": t.params(r)}) for r in todo],
                    self.max_requests,
                    self.max_bytes,
                ):
                    batch = await t.call(
                        lambda part=part: client.messages.batches.create(
                            requests=[e for _, e in part]
                        ),
                        what="batch create",
                    )
                    entry = {
                        "id": batch.id,
                        "custom_ids": [r.key for r, _ in part],
                        "created_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                        "collected": False,
                    }
                    self.state.batches.append(entry)
                    self.state.save()  # at once: a killed run must find this id
                    self.submitted += 1
                    new.append(entry)
                    for r, _ in part:
                        tries[r.key] = tries.get(r.key, 0) + 1
                    self.status(f"submitted batch {batch.id} ({len(part)} requests)")
                await self._collect_all(client, new, by_key, answered, on_result)
            for r in requests:
                if r.key not in answered and r.key in admitted:
                    on_result(
                        r,
                        Failure(
                            f"no batch result after {tries.get(r.key, 0)} submission(s)", None, True
                        ),
                    )
        except _GiveUp as g:
            raise DistillError(
                f"Message Batches API: {g.failure.error}.\n  fix: rerun the same command; submitted "
                f"batches are in {self.state.path} and are polled, not resubmitted"
            ) from None
        finally:
            if t._client is None:
                await client.close()

    async def _collect_all(
        self,
        client: Any,
        batches: list[dict[str, Any]],
        by_key: dict[str, Request],
        answered: set[str],
        on_result: OnResult,
    ) -> None:
        await asyncio.gather(
            *(self._collect(client, b, by_key, answered, on_result) for b in batches)
        )

    async def _collect(
        self,
        client: Any,
        entry: dict[str, Any],
        by_key: dict[str, Request],
        answered: set[str],
        on_result: OnResult,
    ) -> None:
        t = self.teacher
        bid = entry["id"]
        wait = self.poll_min_s
        while True:
            batch = await t.call(lambda: client.messages.batches.retrieve(bid), what=f"batch {bid}")
            if batch.processing_status == "ended":
                break
            c = batch.request_counts
            self.status(
                f"batch {bid}: {batch.processing_status}, {c.processing} processing, "
                f"{c.succeeded} succeeded; next poll in {wait:.1f}s"
            )
            await t.sleep(wait)
            wait = min(self.poll_max_s, wait * 1.5)
        latency = _seconds_between(batch.created_at, batch.ended_at or datetime.now(timezone.utc))

        async def fetch() -> list[Any]:
            return [item async for item in await client.messages.batches.results(bid)]

        items = await t.call(fetch, what=f"batch {bid} results")
        for item in items:
            req = by_key.get(item.custom_id)
            if req is None or item.custom_id in answered:
                continue  # written before a kill, or not part of this run
            res = item.result
            if res.type == "succeeded":
                msg = res.message
                text = "".join(
                    getattr(b, "text", "") for b in msg.content if getattr(b, "type", "") == "text"
                )
                answered.add(item.custom_id)
                on_result(
                    req,
                    Reply(
                        text=text,
                        stop_reason=str(msg.stop_reason or ""),
                        usage=usage_dict(msg.usage),
                        request_id=msg.id,
                        latency_s=round(latency, 3),
                        model=str(msg.model),
                        batch_id=bid,
                    ),
                )
            elif res.type == "errored":
                err = getattr(getattr(res, "error", None), "error", None)
                etype = getattr(err, "type", "") or ""
                if (
                    etype == "invalid_request_error"
                ):  # the request itself is bad: resubmitting cannot help
                    answered.add(item.custom_id)
                    on_result(
                        req,
                        Failure(
                            f"batch item errored: {etype}: {getattr(err, 'message', '')}",
                            400,
                            False,
                        ),
                    )
                else:
                    t.log(f"batch {bid}: {item.custom_id[:12]} errored ({etype}); will resubmit")
            else:
                t.log(f"batch {bid}: {item.custom_id[:12]} {res.type}; will resubmit")
        entry["collected"] = True
        entry["collected_at"] = datetime.now(timezone.utc).isoformat(timespec="seconds")
        self.state.save()
        self.status(f"batch {bid}: ended after {latency:.0f}s; results written")


def state_path_for(out: str | Path) -> Path:
    """Where the batch ids of ``out`` are kept: ``teacher_data.jsonl`` -> ``teacher_data.batches.json``."""
    p = Path(out)
    return p.with_name(p.stem + ".batches.json")
