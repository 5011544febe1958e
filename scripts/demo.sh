#!/usr/bin/env bash
# The main job: serve the embedded tiny model to a heavy and two light clients under FCFS
# and two-stage VTC, and print what each client got.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/setup-env.sh"
exec disagg demo "$@"
