#!/usr/bin/env bash
# Regenerates the PyTorch reference fixtures under tests/fixtures/.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/env.sh
python scripts/gen_fixtures.py
python scripts/gen_optim_fixtures.py
python scripts/gen_amp_fixtures.py
python scripts/gen_optim_follow_fixtures.py
