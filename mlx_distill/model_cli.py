"""``mlx-distill models``: build the embedded demo model, import GGUF files, inspect specs."""

from __future__ import annotations

import click

from mlx_distill.errors import cli_errors


@click.group("models")
def cli() -> None:
    """Import and inspect student models."""


@cli.command("demo")
@click.option(
    "--dtype",
    type=click.Choice(["float32", "quantized"]),
    default="float32",
    show_default=True,
    help="float32: dequantized (fast on CPU); quantized: the GGUF's 8/4-bit weights (for Metal).",
)
@cli_errors
def demo(dtype: str) -> None:
    """Build (once) the embedded SmolLM2-135M-Instruct model; print its directory last."""
    from mlx_distill import models
    from mlx_distill.gguf_import import describe

    path = models.demo_model_dir(dtype)
    click.echo(f"SmolLM2-135M-Instruct from {models.demo_gguf_path().name}: {describe(path)}", err=True)
    click.echo(str(path))


@cli.command("resolve")
@click.argument("spec")
@click.option("--dtype-policy", type=click.Choice(["auto", "float32", "native"]), default="auto",
              show_default=True, help="auto: fp32 on CPU, as stored on a GPU.")
@cli_errors
def resolve_cmd(spec: str, dtype_policy: str) -> None:
    """Resolve a --model value (demo, .gguf, directory, hub id); print the directory last."""
    from mlx_distill import models

    info = models.resolve(spec, dtype_policy)
    click.echo(f"{info.source}: {info.spec}", err=True)
    click.echo(info.path)
