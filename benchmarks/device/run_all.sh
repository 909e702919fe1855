#!/usr/bin/env bash
# The GPU run kit in one device call: every model's script in turn, inside ~9 minutes of a 10-minute call
# (the device lends ~15 minutes a session, its start included). Per script: a training budget (--minutes), then
# its test evaluation, under a hard `timeout` so one hang cannot take the others' time. Results: one JSON per
# model, all.log (every script's output) and status.txt (each script's exit code and seconds) in OUT_DIR.
#
#   here:    python benchmarks/device/bundle.py          # once: runs/device_bundle (carry it)
#   device:  bash benchmarks/device/run_all.sh "$OUT"    # run(command=..., carry=["runs/device_bundle"], timeout_s=600)
#   CPU:     bash benchmarks/device/run_all.sh OUT_DIR --tiny
#
# Exit: 0 all ran; 1 one or more failed; 2 no CUDA (one line, nothing run) unless --tiny.
set -u
cd "$(dirname "$0")/../.."
OUT_DIR=${1:-${OUT:-runs/device_kit}}
shift || true
EXTRA=("$@")
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] && [ -z "${PYTHON:-}" ] && ! "$PY" -c "import torch" 2>/dev/null && PY=.venv/bin/python
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
mkdir -p "$OUT_DIR"
TINY=0
for a in "${EXTRA[@]}"; do [ "$a" = "--tiny" ] && TINY=1; done
if [ $TINY = 0 ] && ! "$PY" -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 2)"; then
  echo "CUDA not available: run with --tiny for the CPU check"
  exit 2
fi
[ $TINY = 1 ] && export OMP_NUM_THREADS=1
: > "$OUT_DIR/status.txt"
fail=0
# script  training-minutes  hard-cap-seconds  (sum of caps: 540 s)
run() {
  local script=$1 minutes=$2 cap=$3 t0=$SECONDS rc
  echo "=== $script (train $minutes min, cap $cap s)" >> "$OUT_DIR/all.log"
  timeout -k 5 "$cap" "$PY" "benchmarks/device/$script" --minutes "$minutes" --out "$OUT_DIR" "${EXTRA[@]}" \
    >> "$OUT_DIR/all.log" 2>&1
  rc=$?
  echo "$script rc=$rc seconds=$((SECONDS - t0))" | tee -a "$OUT_DIR/status.txt"
  [ $rc -ne 0 ] && fail=1
  return 0
}
run run_sasrec.py 0.7 80
run run_bert4rec.py 0.7 80
run run_flare.py 1.0 110
run run_recformer.py 1.0 120
run run_calrec.py 1.2 150 --eval-users 256
tail -n 3 "$OUT_DIR/all.log"
exit $fail
