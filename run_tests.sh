#!/usr/bin/env bash
# Run the test suite: pytest (library), then nbval (--nbval-lax) over every notebook at the smoke
# profile (the notebooks' default parameters). The summary notebooks (Table 1, Figures 3-5) need
# the outputs of every stage for every denoiser, so the smoke pipeline runs first (one job per
# core; a second run with one job at a time must give the same tables); stages that are up to
# date are skipped, and nbval's re-execution reuses their checkpoints.
# Extra arguments go to the first pytest call.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
source "$ROOT/scripts/setup_env.sh"
cd "$ROOT"
python -m pytest tests "$@"
python -m invariscope.pipeline --profile smoke
# the same run with one job at a time in a scratch copy: the same tables (tests/test_parallel_smoke.py)
INVARISCOPE_COMPARE_SMOKE=1 python -m pytest -q -p no:cacheprovider tests/test_parallel_smoke.py
# the GPU check's code paths on the CPU (smoke comparison, paper-size steps, two gloo processes)
PYTHON=python bash benchmarks/gpu_check.sh --dry-run
python -m pytest --nbval-lax --nbval-current-env -p no:cacheprovider notebooks
