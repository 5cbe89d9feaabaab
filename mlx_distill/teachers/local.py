"""A local MLX model as the teacher (``local:SPEC``, ``demo``): batched generation, cost 0.

``demo`` is the embedded SmolLM2-135M under the long style system prompt in
``assets/teacher_style.md`` (context distillation: the student later learns to
answer in that style without the prompt). Token counts are the real ones from
the model's tokenizer; stop reasons use the Messages API words (``end_turn``,
``max_tokens``) so every teacher's records read the same.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from typing import Any

from mlx_distill.errors import ConfigError
from mlx_distill.teachers import Admit, OnResult, Reply, Request, Teacher, style_prompt

STOP_REASONS = {"eos": "end_turn", "length": "max_tokens"}


class LocalTeacher(Teacher):
    OPTIONS = ("batch_size", "dtype_policy", "loader")
    paid = False
    default_max_tokens = 512

    def __init__(
        self,
        model: str,
        *,
        batch_size: int = 8,
        dtype_policy: str = "auto",
        loader: Callable[..., tuple[Any, Any, Any]] | None = None,
    ):
        if batch_size < 1:
            raise ConfigError(f"--batch-size must be >= 1, got {batch_size}")
        self.model = model
        self.spec = "demo" if model == "demo" else f"local:{model}"
        self.default_system = style_prompt() if model == "demo" else None
        self.batch_size = int(batch_size)
        self.dtype_policy = dtype_policy
        self._loader = loader
        self._loaded: tuple[Any, Any, Any] | None = None

    def load(self) -> tuple[Any, Any]:
        """(model, tokenizer), loaded once under the dtype policy (fp32 on CPU)."""
        if self._loaded is None:
            if self._loader is None:
                from mlx_distill import models

                self._loader = models.load
            self._loaded = self._loader(self.model, None, self.dtype_policy)
        return self._loaded[0], self._loaded[1]

    def check_ready(self) -> None:
        self.load()

    def max_context(self) -> int:
        """The model's context in tokens (config ``max_position_embeddings``; 8,192 for SmolLM2)."""
        model, _ = self.load()
        args = getattr(model, "args", None)
        for name in ("max_position_embeddings", "max_seq_len", "context_length"):
            value = getattr(args, name, None)
            if isinstance(value, int) and value > 0:
                return value
        return 4096

    def prompt_tokens(self, prompt: str, system: str | None) -> int:
        """Tokens of the full chat (system + prompt + template), as the model will see it."""
        from mlx_distill.generate import chat_tokens

        _, tokenizer = self.load()
        return len(chat_tokens(tokenizer, prompt, system))

    def context_limit(self, prompt: str, system: str | None, max_tokens: int) -> str | None:
        n, ctx = self.prompt_tokens(prompt, system), self.max_context()
        if n + max_tokens > ctx:
            return (
                f"the chat is {n:,} tokens with the system prompt; with {max_tokens} for the answer "
                f"that exceeds {self.model}'s context of {ctx:,} tokens"
            )
        return None

    def run(
        self, requests: Sequence[Request], on_result: OnResult, *, admit: Admit | None = None
    ) -> None:
        from mlx_distill.generate import generate_batch

        todo = [r for r in requests if admit is None or admit(r)]
        if not todo:
            return
        model, tokenizer = self.load()
        # One generate_batch per distinct (system, sampling) group, in input order: the
        # collector sends one group, so all prompts share one continuous batch.
        groups: dict[tuple, list[Request]] = {}
        for r in todo:
            groups.setdefault((r.system, r.max_tokens, r.temperature, r.top_p), []).append(r)
        for (system, max_tokens, temperature, top_p), group in groups.items():
            t0 = time.perf_counter()

            def done(i: int, c: Any, group: list[Request] = group, t0: float = t0) -> None:
                on_result(
                    group[i],
                    Reply(
                        text=c.text,
                        stop_reason=STOP_REASONS.get(c.stop_reason, c.stop_reason),
                        usage={
                            "input_tokens": c.prompt_tokens,
                            "output_tokens": c.completion_tokens,
                            "cache_creation_input_tokens": 0,
                            "cache_read_input_tokens": 0,
                        },
                        request_id=None,
                        latency_s=round(time.perf_counter() - t0, 3),
                        model=self.model,
                    ),
                )

            generate_batch(
                model,
                tokenizer,
                [r.prompt for r in group],
                system=system,
                max_tokens=max_tokens,
                temperature=temperature or 0.0,
                top_p=1.0 if top_p is None else top_p,
                batch_size=self.batch_size,
                on_done=done,
            )

    def close(self) -> None:
        self._loaded = None
