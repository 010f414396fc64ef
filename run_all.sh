#!/usr/bin/env bash
# Run the pipeline's notebooks (papermill, under Snakemake: workflow/Snakefile) for one profile.
#   ./run_all.sh [--profile smoke|default|paper|FILE.yaml] [--data DIR] [--only|--from|--until STAGE]
#                [--denoisers a,b] [--device DEV] [--force] [--jobs N] [--threads T] [--gpus 0,1]
#                [--executor slurm] [--dry-run] [--check]      (docs/workflow.md; --help lists all)
# Relative FILE.yaml and DIR paths are taken from the directory you run it in.
# Executed notebooks go to runs/<profile>/notebooks/, figures and tables to figures/<profile>/.
set -euo pipefail
export INVARISCOPE_CALLER_CWD="$PWD"
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
source "$ROOT/scripts/setup_env.sh"
cd "$ROOT"
exec "$ROOT/.venv/bin/python" -m invariscope.pipeline "$@"
