# The two commands of the README. Each does its own set-up first (idempotent).
.PHONY: demo test test-fast lint bench

demo:            ## offline demo end to end on the embedded model
	@scripts/setup.sh
	.venv/bin/mlx-distill demo

test:            ## the whole test suite, slow tests included (what CI runs)
	@scripts/setup.sh --test
	MLX_DISTILL_TF4_PYTHON=$(CURDIR)/.venv-tf4/bin/python .venv/bin/python -m pytest -q

test-fast:       ## unit tests only
	@scripts/setup.sh --test
	.venv/bin/python -m pytest -q -m "not slow"

lint:
	.venv/bin/ruff check mlx_distill tests scripts

bench:           ## every benchmark; writes docs/benchmarks.md
	@scripts/setup.sh --test
	scripts/bench_all.sh
