#!/usr/bin/env bash
# Set up and run the whole test suite (no data set or network needed).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
bash scripts/setup.sh
.venv/bin/python -m pytest "$@"
