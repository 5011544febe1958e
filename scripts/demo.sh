#!/usr/bin/env bash
# The main job: generate with the embedded tiny model and print outputs and tokens/s.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/setup-env.sh"
exec disagg demo "$@"
