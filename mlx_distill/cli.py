"""The ``mlx-distill`` command group.

A thin layer: each subcommand lives beside the stage code it calls (as a click
command named ``cli`` in that module), and is imported only when invoked, so
``mlx-distill --help`` does not pay for importing MLX, mlx-lm or transformers.
``python -m mlx_distill.train`` and ``mlx-distill train`` are the same object.
"""

from __future__ import annotations

import importlib

import click

# name -> (module, help). Modules expose a click command called ``cli``.
COMMANDS: dict[str, tuple[str, str]] = {
    "models": ("mlx_distill.model_cli", "Import and inspect student models (the embedded demo model)."),
    "expand": ("mlx_distill.expand", "Ask a teacher for prompt variants."),
    "collect": ("mlx_distill.collect", "Collect teacher answers for a prompt file."),
    "prepare": ("mlx_distill.dataset", "Turn teacher data into mlx-lm chat JSONL (train/valid/test)."),
    "train": ("mlx_distill.train", "LoRA/DoRA/full fine-tuning on mlx-lm's tuner."),
    "generate": ("mlx_distill.generate", "Batched MLX generation for a prompt file."),
    "compare": ("mlx_distill.compare", "Score teacher, base and distilled answers; write scores and report."),
    "visuals": ("mlx_distill.visuals", "Draw the run's charts into RUN/visuals."),
    "export": ("mlx_distill.export", "Fuse the adapter into a Hugging Face model folder (and PEFT/GGUF)."),
    "verify": ("mlx_distill.verify", "Check an export against the adapter-applied MLX model."),
    "run": ("mlx_distill.pipeline", "Run the whole pipeline from a YAML config, resumably."),
    "demo": ("mlx_distill.pipeline", "Run the offline demo end to end on the embedded model."),
}


class LazyGroup(click.Group):
    def list_commands(self, ctx: click.Context) -> list[str]:
        return list(COMMANDS)

    def get_command(self, ctx: click.Context, name: str) -> click.Command | None:
        if name not in COMMANDS:
            return None
        module_name, _ = COMMANDS[name]
        module = importlib.import_module(module_name)
        attr = f"{name}_cli" if hasattr(module, f"{name}_cli") else "cli"
        return getattr(module, attr)

    def format_commands(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        with formatter.section("Commands"):
            formatter.write_dl([(name, help_) for name, (_, help_) in COMMANDS.items()])


@click.group(cls=LazyGroup)
@click.version_option(package_name="mlx-distill")
def main() -> None:
    """Distill a large teacher LLM into a small student that runs locally with MLX.

    Offline demo: `mlx-distill demo`. Tracebacks: MLX_DISTILL_DEBUG=1.
    """
