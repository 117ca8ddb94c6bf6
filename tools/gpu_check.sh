#!/usr/bin/env bash
# The prepared device check of issues 7 and 15 (<= 7 minutes on one H100 / H200 with the preinstalled
# JAX): logits parity, then tokens/s and MFU of the bf16 gradient step and of the SIMU step of an
# OLMo-1B-sized random model, the SO and Sophia-H steps there (SIMU / SO, Sophia-H / SO), IG
# attribution / gradient on an 8-layer model of that width, and the HVP/grad ratio. See tools/gpu_check.py.
#
#   bash tools/gpu_check.sh            # writes $OUT/gpu_check.json (or ./gpu_check.json) and prints it
#   bash tools/gpu_check.sh --tiny     # the same on tiny sizes (tries the script on a CPU)
#
# Never needed by a test. The python side skips sections it has no time left for and rewrites the
# JSON after each section, so a run cut short by the outer timeout still leaves its numbers.
set -uo pipefail
cd "$(dirname "$0")/.."
out_dir="${OUT:-.}"
mkdir -p "$out_dir"
if command -v nvidia-smi >/dev/null 2>&1; then
  nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv | tee "$out_dir/gpu_check_nvidia_smi.txt"
fi
export XLA_PYTHON_CLIENT_MEM_FRACTION="${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.90}"
export TF_CPP_MIN_LOG_LEVEL="${TF_CPP_MIN_LOG_LEVEL:-1}"
timeout --signal=TERM --kill-after=10 420 python tools/gpu_check.py --out "$out_dir/gpu_check.json" --budget-s 380 "$@"
rc=$?
if [ "$rc" -ne 0 ]; then
  echo "gpu_check: python exited with $rc (124 = outer timeout); partial results in $out_dir/gpu_check.json" >&2
fi
exit "$rc"
