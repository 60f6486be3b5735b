#!/usr/bin/env bash
# The README's demo command: set up (idempotent), then run the demo.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/python scripts/demo_mountctl.py
