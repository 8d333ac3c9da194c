#!/usr/bin/env bash
# The quick-start job: set up, then a small study on MNIST-1D (generated locally by the `mnist1d` package):
# a 1-D CNN teacher and an MLP student, the student alone, with KD and at KD's label weight (the control),
# 5 seeds; prints the tables (mean ± std, † where a difference is beyond the seed spread) and writes the plot.
# Running it again reprints (finished runs are kept; a stopped study continues where it stopped).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
bash scripts/setup.sh
out=${OUT:-runs/studies/demo}
.venv/bin/kdflow study studies/demo.yaml --out "$out" --workers 2 "$@"
.venv/bin/kdflow report "$out" --show
