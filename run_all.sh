#!/usr/bin/env bash
# Run the pipeline's notebooks with papermill for one profile.
#   ./run_all.sh [--profile smoke|default|paper] [--data /path/to/LDCT-and-Projection-data] [--force]
#                [--dry-run]
# Executed notebooks go to runs/<profile>/notebooks/, figures and tables to figures/<profile>/.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
source "$ROOT/scripts/setup_env.sh"
cd "$ROOT"
exec "$ROOT/.venv/bin/python" -m invariscope.pipeline "$@"
