#!/usr/bin/env python
"""Regenerate a run's charts, as in the reference run: `python scripts/generate_visuals.py RUN_DIR`."""

import mlx_distill  # noqa: F401
from mlx_distill.visuals import cli

if __name__ == "__main__":
    cli()
