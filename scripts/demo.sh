#!/usr/bin/env bash
# The main job: serve SmolLM2-135M-Instruct to a heavy and two light clients under FCFS
# and two-stage VTC, and print what each client got (`--model tiny` for the random-weight
# model, seconds instead of minutes).
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/setup-env.sh"
exec disagg demo "$@"
