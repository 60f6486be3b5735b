#!/usr/bin/env bash
# The project's test command: set up (idempotent), lint, type-check, then run the default suite.
# Extra arguments go to pytest, e.g. `bash scripts/test.sh -m slow` for the long runs.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
.venv/bin/ruff check unionfs mountctl benchmarks tests scripts
.venv/bin/mypy
exec .venv/bin/python -m pytest "$@"
