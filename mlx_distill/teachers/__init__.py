"""Teachers: one small interface, one provider per file.

* ``anthropic:MODEL``: Claude through the official SDK's ``AsyncAnthropic``
  (concurrent, with its own retry policy; :mod:`mlx_distill.teachers.anthropic`);
* ``local:SPEC``: any ``--model`` spec that :func:`mlx_distill.models.resolve`
  accepts (a directory, a .gguf file, a hub id), answering with batched MLX
  generation (:mod:`mlx_distill.teachers.local`);
* ``demo``: the embedded SmolLM2-135M under a long style system prompt
  (context distillation), the offline default.

Every teacher answers a list of :class:`Request` and reports each outcome, as it
arrives, as a :class:`Reply` (text, stop reason, the four usage fields, request id,
latency) or a :class:`Failure`. Provider SDKs are imported inside the providers.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from mlx_distill.errors import ConfigError, DistillError
from mlx_distill.pricing import USAGE_FIELDS, zero_usage

STYLE_PROMPT_FILE = Path(__file__).resolve().parent.parent / "assets" / "teacher_style.md"


def style_prompt_path() -> Path:
    """The default style system prompt of the demo teacher (``assets/teacher_style.md``)."""
    return STYLE_PROMPT_FILE


def style_prompt() -> str:
    """Its text: what makes SmolLM2-135M answer coding prompts in a Claude-like layout."""
    return STYLE_PROMPT_FILE.read_text(encoding="utf-8").strip()


@dataclass
class Request:
    """One prompt to answer. ``key`` identifies it (the collector's record key; the
    batch ``custom_id``), so it must be unique within one ``run``."""

    key: str
    prompt: str
    system: str | None = None
    max_tokens: int = 1024
    temperature: float | None = None  # None: the provider's default
    top_p: float | None = None


@dataclass
class Reply:
    text: str
    stop_reason: str  # the Messages API vocabulary: end_turn | max_tokens | stop_sequence | refusal
    usage: dict[str, int] = field(default_factory=zero_usage)  # USAGE_FIELDS, all four
    request_id: str | None = None
    latency_s: float = 0.0
    model: str = ""
    batch_id: str | None = None  # set when answered through the Message Batches API (50% price)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class Failure:
    error: str
    status: int | None = None
    retryable: bool = True  # False: the request itself is bad (400); a rerun would fail again


OnResult = Callable[[Request, "Reply | Failure"], None]
Admit = Callable[[Request], bool]


class TeacherFatal(DistillError):
    """Stop everything: a wrong key, an unknown model, a spend limit. Never retried."""


class Teacher(ABC):
    """The interface every provider implements (keep it small: others depend on it)."""

    spec: str = ""  # as given: anthropic:claude-sonnet-4-6, local:PATH, demo
    model: str = ""  # the model name recorded with each answer
    paid: bool = False  # True: answers cost money (prices from mlx_distill.pricing)
    default_system: str | None = None  # used when the caller passes no system prompt
    default_max_tokens: int = 1024
    sampling: bool = True  # False: the provider takes no temperature/top_p (see check_sampling)

    @abstractmethod
    def run(
        self, requests: Sequence[Request], on_result: OnResult, *, admit: Admit | None = None
    ) -> None:
        """Answer ``requests``; call ``on_result(request, Reply | Failure)`` as each ends, in
        the calling thread. ``admit(request)`` is asked right before a request is first sent;
        False skips it (the budget). Raises :class:`TeacherFatal` after letting in-flight
        requests end when no further request can succeed (wrong key, spend limit)."""

    def check_ready(self) -> None:
        """Fail fast (ConfigError) before anything is spent: a missing key, an unloadable model."""
        return None

    def context_limit(self, prompt: str, system: str | None, max_tokens: int) -> str | None:
        """Why ``prompt`` cannot fit the teacher's context (None if it fits)."""
        return None

    def complete(
        self,
        prompt: str,
        *,
        system: str | None = None,
        max_tokens: int | None = None,
        temperature: float | None = None,
    ) -> Reply:
        """One answer (raises DistillError if it fails after the provider's retries)."""
        out: list[Reply | Failure] = []
        req = Request("single", prompt, system, max_tokens or self.default_max_tokens, temperature)
        self.run([req], lambda _r, o: out.append(o))
        if not out or isinstance(out[0], Failure):
            raise DistillError(f"teacher {self.spec}: {out[0].error if out else 'no answer'}")
        return out[0]

    def close(self) -> None:
        """Release clients and models."""
        return None


def check_sampling(teacher: Teacher, temperature: float | None, top_p: float | None) -> None:
    """ConfigError when sampling flags are given to a teacher that cannot take them."""
    if not teacher.sampling and (temperature is not None or top_p is not None):
        flag = "--temperature" if temperature is not None else "--top-p"
        raise ConfigError(
            f"{flag}: {teacher.spec} takes no sampling parameters (Anthropic API version 2026-10-21, "
            "which SDK 2.x sends, rejects temperature/top_p/top_k with a 400 even at their defaults).\n"
            f"  fix: leave {flag} unset for Claude teachers; it applies to local:/demo teachers"
        )


def usage_dict(usage: Any) -> dict[str, int]:
    """The four token fields from an SDK usage object or a mapping (None -> 0)."""
    get = usage.get if isinstance(usage, dict) else (lambda k: getattr(usage, k, None))
    return {k: int(get(k) or 0) for k in USAGE_FIELDS}


def make_teacher(spec: str, **options: Any) -> Teacher:
    """``anthropic:MODEL`` | ``local:SPEC`` | ``demo`` -> a Teacher (nothing is loaded or sent yet).

    ``options`` go to the provider (anthropic: ``concurrency``, ``max_attempts``,
    ``timeout_s``, ``api_key``, ``base_url`` ...; local: ``batch_size``, ``dtype_policy``).
    """
    s = (spec or "").strip()
    if s.startswith("anthropic:"):
        model = s.split(":", 1)[1].strip()
        if not model:
            raise ConfigError(
                "--teacher anthropic: needs a model, e.g. --teacher anthropic:claude-sonnet-4-6"
            )
        from mlx_distill.teachers.anthropic import AnthropicTeacher

        return AnthropicTeacher(model, **_only(options, AnthropicTeacher.OPTIONS))
    if s.startswith("claude"):
        raise ConfigError(f"--teacher {s}: write it as anthropic:{s}")
    if s == "demo" or s.startswith("local:"):
        from mlx_distill.teachers.local import LocalTeacher

        model = "demo" if s == "demo" else s.split(":", 1)[1].strip()
        if not model:
            raise ConfigError(
                "--teacher local: needs a model: local:DIR, local:FILE.gguf or local:ORG/NAME"
            )
        return LocalTeacher(model, **_only(options, LocalTeacher.OPTIONS))
    raise ConfigError(
        f"--teacher {spec!r}: expected anthropic:MODEL (e.g. anthropic:claude-sonnet-4-6), "
        "local:PATH (a model directory, .gguf file or hub id) or demo"
    )


def _only(options: dict[str, Any], allowed: tuple[str, ...]) -> dict[str, Any]:
    return {k: v for k, v in options.items() if k in allowed and v is not None}
