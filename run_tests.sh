#!/usr/bin/env bash
# Run the test suite: pytest (library) and nbval (--nbval-lax) over the notebooks at the smoke
# profile (the notebooks' default parameters).  Extra arguments go to the first pytest call.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
source "$ROOT/scripts/setup_env.sh"
cd "$ROOT"
python -m pytest tests "$@"
python -m pytest --nbval-lax --nbval-current-env -p no:cacheprovider notebooks
