#!/usr/bin/env bash
# The quick-start job: set up, fetch Fashion-MNIST if missing, train a teacher, distil a student,
# print the table (teacher, student alone, student with KD). Running it again resumes or reprints.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
bash scripts/setup.sh
bash scripts/get-fashion-mnist.sh
out=${OUT:-runs/fashion-mnist-demo}
resume=(); [ -e "$out/last.pt" ] && resume=(--resume)
.venv/bin/kdflow train recipes/fashion_mnist/demo.yaml --out "$out" "${resume[@]}" "$@"
