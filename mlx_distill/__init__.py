"""mlx-distill: distill a large teacher LLM into a small local student with MLX."""

from mlx_distill import _blas

# Must run before anything imports mlx.core (see _blas for the measured reason).
_blas.preload()

__version__ = "0.1.0"
