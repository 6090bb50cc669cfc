#!/usr/bin/env bash
# Set up everything (scripts/setup.sh) and run klcrypt's main job on a demo.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
echo
echo "== klcrypt benchmark (AES-XTS engines on this CPU)"
.venv/bin/klcrypt benchmark
