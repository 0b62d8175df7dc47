#!/usr/bin/env bash
# One-shot GPU check, within 8 minutes of device time: for one NVIDIA GPU (H100/H200) with a
# CUDA-enabled jax already installed (the workplace's device image has jax 0.11.2 with the CUDA 13
# plugin, flax, optax, orbax, safetensors, sentencepiece) and no internet.
#
#   bash benchmarks/gpu_check.sh        # from the repository root; results in $OUT (default ./gpu_out)
#
# Steps, each time-limited (a failing step does not stop the next):
#   1. versions and devices                                              -> $OUT/devices.txt
#   2. the GPU kernel tests compiled for the GPU (not interpreted): flash forward + gradients over
#      the pairwise variant grid, decode                                 -> $OUT/tests.txt, junit.xml
#   3. the whole model (Phi-3-mini shape, 4 layers, bf16): prefill, a training step (unpacked and
#      packed rows) and decode, attention_impl pallas / cudnn / auto against xla -> $OUT/model_check.json
#   4. with the time left: the attention benchmark (ours / xla / cudnn)  -> $OUT/bench_attention.{json,md}
#   5. a summary                                                         -> $OUT/SUMMARY.md
#
# Another jax can be brought as wheels in .whl/ (see the device tool's README); a newer jaxlib wheel
# is over 80 MB, more than a call can carry, so the check runs on the image's jax (inside
# phi3jax's supported range, jax>=0.10.2,<0.13).
set -uo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
OUT="${OUT:-$REPO/gpu_out}"
PY="${PYTHON:-python3}"
BUDGET="${BUDGET_SECONDS:-480}"
mkdir -p "$OUT"
cd "$REPO"
START=$(date +%s)
elapsed() { echo $(( $(date +%s) - START )); }
left() { echo $(( BUDGET - $(elapsed) )); }
log() { echo "[gpu_check +$(elapsed)s] $*" | tee -a "$OUT/log.txt"; }

if [ -d "$REPO/.whl" ]; then
  log "installing the wheels in .whl/ into /tmp/site"
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
    "$REPO"/.whl/*.whl >> "$OUT/log.txt" 2>&1 && export PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"
export XLA_PYTHON_CLIENT_PREALLOCATE=false  # so program memory and peaks mean something
export PYTHONUNBUFFERED=1

# ---------------------------------------------------------------- 1. versions and devices
(nvidia-smi || true) > "$OUT/nvidia-smi.txt" 2>&1
"$PY" - > "$OUT/devices.txt" 2>&1 <<'EOF'
import flax, jax, optax
print("jax", jax.__version__, "flax", flax.__version__, "optax", optax.__version__, "backend", jax.default_backend())
for d in jax.devices():
    print(d, d.device_kind)
EOF
tee -a "$OUT/log.txt" < "$OUT/devices.txt"
if ! grep -q "backend gpu" "$OUT/devices.txt"; then
  log "JAX does not see a GPU: stopping"
  printf "# GPU check\n\nJAX sees no GPU; see devices.txt\n" > "$OUT/SUMMARY.md"
  exit 1
fi

# ---------------------------------------------------------------- 2. kernel tests on the GPU
# On a GPU backend the tests compile the Triton kernels; the TPU-interpreter tests are skipped.
log "kernel tests (compiled for the GPU)"
timeout 170 "$PY" -m pytest -q -p no:cacheprovider tests/test_kernels.py -k "gpu" --junitxml "$OUT/junit.xml" \
  > "$OUT/tests.txt" 2>&1
rc=$?
status_tests="$(tail -1 "$OUT/tests.txt") (exit $rc)"
[ $rc -eq 124 ] && status_tests="TIMED OUT after 170 s: $(grep -E 'passed|failed' "$OUT/tests.txt" | tail -1)"
log "tests: $status_tests"

# ---------------------------------------------------------------- 3. the whole model
log "model check (Phi-3-mini shape, 4 layers, bf16; pallas / cudnn / auto against xla)"
timeout 180 "$PY" benchmarks/gpu_model_check.py > "$OUT/model_check.json" 2> "$OUT/model_check.err"
rc=$?
status_model="exit $rc"
[ $rc -eq 124 ] && status_model="TIMED OUT after 180 s"
log "model check: $status_model"
tail -60 "$OUT/model_check.json" | tee -a "$OUT/log.txt"

# ---------------------------------------------------------------- 4. benchmark, with the time left
status_bench="skipped (no time left)"
if [ "$(left)" -gt 60 ]; then
  seconds=$(( $(left) - 20 ))
  log "attention benchmark for up to ${seconds}s"
  timeout "$seconds" "$PY" benchmarks/bench_attention.py --max-seconds $(( seconds - 15 )) --case-seconds 20 \
    --repeats 10 --json "$OUT/bench_attention.json" --markdown "$OUT/bench_attention.md" > "$OUT/bench.txt" 2>&1
  status_bench="exit $?"
fi
log "benchmark: $status_bench"

# ---------------------------------------------------------------- 5. summary
{
  echo "# GPU check"
  echo
  echo "- $(head -1 "$OUT/devices.txt"); device: $(sed -n 2p "$OUT/devices.txt")"
  echo "- kernel tests: $status_tests"
  echo "- model check: $status_model"
  echo "- benchmark: $status_bench"
  echo "- total time: $(elapsed) s"
  echo
  grep -E "^(FAILED|ERROR)" "$OUT/tests.txt" | head -20 | sed 's/^/    /'
  echo
  echo '```json'
  cat "$OUT/model_check.json"
  echo '```'
  echo
  if [ -s "$OUT/bench_attention.md" ]; then cat "$OUT/bench_attention.md"; fi
} > "$OUT/SUMMARY.md"
cat "$OUT/SUMMARY.md"
