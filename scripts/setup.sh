#!/usr/bin/env bash
# Idempotent set-up: a virtual environment in .venv with kdflow and its pinned torch.
# Source it or run it; later runs reinstall only when pyproject.toml changed.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
python=${PYTHON:-$(command -v python3.11 || command -v python3)}
if [ ! -x .venv/bin/python ]; then
  echo "setup: creating .venv with $($python --version)"
  "$python" -m venv .venv
fi
want=$(sha256sum pyproject.toml | cut -d' ' -f1)
if [ "$(cat .venv/.kdflow-installed 2>/dev/null)" != "$want" ]; then
  echo "setup: installing kdflow and its dependencies (torch==2.13.0, CPU build where available)"
  .venv/bin/python -m pip install -qq --disable-pip-version-check -e ".[test]"
  echo "$want" > .venv/.kdflow-installed
fi
