#!/usr/bin/env bash
# Rerun every benchmark, one after the other (never in parallel: they measure this machine),
# updating docs/benchmarks.md. About 40 minutes on a 2-core CPU (kd alone ~24); the demo timing is separate.
#
#   scripts/bench_all.sh            # everything
#   ONLY="train generate" scripts/bench_all.sh
#
# Each script prints its figures as one JSON object on its last line; this collects them into
# $OUT/bench_all.jsonl (default: runs/bench/) and exits non-zero if a script failed.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
[ -x "$PY" ] || PY=python3
OUT=${OUT:-runs/bench}
mkdir -p "$OUT"
: > "$OUT/bench_all.jsonl"
ONLY=${ONLY:-"train generate cpu-ops collect kd"}
failed=()
run() {  # name, then the command
  local name=$1; shift
  case " $ONLY " in *" $name "*) ;; *) return 0 ;; esac
  echo "== $name: $* (load average $(cut -d' ' -f1 /proc/loadavg 2>/dev/null || echo ?))" >&2
  local start=$SECONDS
  if "$@" > "$OUT/$name.log" 2>&1; then
    tail -n 1 "$OUT/$name.log" >> "$OUT/bench_all.jsonl"
    echo "   done in $((SECONDS - start)) s: $(tail -c 300 "$OUT/$name.log" | tail -n 1 | cut -c1-200)" >&2
  else
    failed+=("$name")
    echo "   FAILED after $((SECONDS - start)) s; see $OUT/$name.log" >&2
    tail -n 20 "$OUT/$name.log" >&2
  fi
}
run train "$PY" scripts/bench_train.py --rounds "${TRAIN_ROUNDS:-1}"
run generate "$PY" scripts/bench_generate.py
run cpu-ops "$PY" scripts/bench_cpu_ops.py
run collect "$PY" scripts/bench_collect.py
if [ -f scripts/bench_kd.py ]; then run kd "$PY" scripts/bench_kd.py; fi
echo "results: $OUT/bench_all.jsonl; docs: docs/benchmarks.md" >&2
[ ${#failed[@]} -eq 0 ] || { echo "failed: ${failed[*]}" >&2; exit 1; }
