#!/usr/bin/env bash
# Runs the whole test suite on CPU (Triton kernels under the Triton interpreter).
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/setup-env.sh"
cd "$(dirname "${BASH_SOURCE[0]}")/.."
exec python -m pytest "$@"
