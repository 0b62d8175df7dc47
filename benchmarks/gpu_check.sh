#!/usr/bin/env bash
# One-shot GPU check of the Pallas attention kernels: for a machine with one NVIDIA GPU (H100),
# a bare Python 3.12 (no jax) and no internet. Budget: about 10 minutes.
#
#   bash benchmarks/gpu_check.sh            # from the repository root; results go to $OUT (default ./gpu_out)
#
# What it does (each step time-limited, a failing step does not stop the next):
#   1. installs jax + CUDA 12 plugin + pytest into a fresh venv from the wheels in .whl/ (no index);
#      only if that fails, tries PyPI
#   2. runs the GPU kernel tests compiled for the GPU (not interpreted): flash forward + gradients
#      over the pairwise variant grid, decode, prefill with offsets     -> $OUT/tests.txt, junit.xml
#   3. runs benchmarks/bench_attention.py: ours vs xla vs cudnn, seq 512..8192, fwd and fwd+bwd,
#      TFLOP/s and program memory                                       -> $OUT/bench_attention.{json,md}
#   4. prints a summary and writes it to $OUT/SUMMARY.md
#
# The wheels to carry in .whl/ (at the repository root) for Python 3.12, manylinux x86_64. On any
# machine with internet (pip >= 23):
#
#   pip download --dest .whl --only-binary=:all: --python-version 3.12 --implementation cp --abi cp312 \
#     --platform manylinux_2_27_x86_64 --platform manylinux_2_28_x86_64 \
#     --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 \
#     "jax[cuda12]==0.10.2" "pytest>=8"
#
# That resolves (checked 2026-11) to about 3 GB: jax 0.10.2, jaxlib 0.10.2, jax-cuda12-plugin 0.10.2,
# jax-cuda12-pjrt 0.10.2, ml_dtypes, numpy, scipy, opt_einsum, nvidia-{cublas, cuda-cccl, cuda-cupti,
# cuda-nvcc, cuda-nvrtc, cuda-runtime, cudnn, cufft, cusolver, cusparse, nccl, nvjitlink,
# nvshmem}-cu12, pytest, pluggy, iniconfig, packaging, pygments. The NVIDIA driver must support
# CUDA 12 (>= 525; >= 550 recommended).
set -uo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
OUT="${OUT:-$REPO/gpu_out}"
PY="${PYTHON:-python3}"
VENV="${VENV:-/tmp/phi3jax-gpu-venv}"
JAX_SPEC="jax[cuda12]==0.10.2"
mkdir -p "$OUT"
cd "$REPO"
START=$(date +%s)
log() { echo "[gpu_check +$(( $(date +%s) - START ))s] $*" | tee -a "$OUT/log.txt"; }
status_install="not run"; status_tests="not run"; status_bench="not run"

log "repo $REPO, out $OUT, python $($PY --version 2>&1)"
(nvidia-smi || true) > "$OUT/nvidia-smi.txt" 2>&1
head -15 "$OUT/nvidia-smi.txt" | tee -a "$OUT/log.txt"

# ---------------------------------------------------------------- 1. install
# A machine image that already has a CUDA-enabled jax (any recent version) is used as it is.
if "$PY" -c "import jax, sys; sys.exit(0 if jax.default_backend() == 'gpu' else 1)" > /dev/null 2>&1; then
  VPY="$(command -v "$PY")"
  status_install="preinstalled ($("$PY" -c 'import jax; print("jax", jax.__version__)'))"
elif [ ! -x "$VENV/bin/python" ]; then
  "$PY" -m venv "$VENV" >> "$OUT/log.txt" 2>&1 || { log "cannot create a venv with $PY"; exit 1; }
fi
[ "$status_install" = "not run" ] && VPY="$VENV/bin/python"
if [ "$status_install" = "not run" ] && [ -d "$REPO/.whl" ]; then
  log "installing from .whl/ ($(ls "$REPO/.whl" | wc -l) files)"
  timeout 300 "$VPY" -m pip install --no-index --find-links "$REPO/.whl" "$JAX_SPEC" "pytest>=8" > "$OUT/pip.txt" 2>&1 \
    && status_install="ok (.whl)"
fi
if [ "$status_install" = "not run" ]; then
  log "no usable .whl/: trying PyPI (may not be reachable)"
  timeout 420 "$VPY" -m pip install --default-timeout 30 "$JAX_SPEC" "pytest>=8" >> "$OUT/pip.txt" 2>&1 \
    && status_install="ok (PyPI)" || status_install="FAILED (see pip.txt)"
fi
log "install: $status_install"
"$VPY" - > "$OUT/devices.txt" 2>&1 <<'EOF'
import jax
print("jax", jax.__version__, "backend", jax.default_backend())
for d in jax.devices():
    print(d, d.device_kind)
EOF
cat "$OUT/devices.txt" | tee -a "$OUT/log.txt"
if ! grep -q "backend gpu" "$OUT/devices.txt"; then
  log "JAX does not see a GPU: stopping (see devices.txt, pip.txt)"
  printf "# GPU check\n\ninstall: %s\nJAX sees no GPU; see devices.txt\n" "$status_install" > "$OUT/SUMMARY.md"
  exit 1
fi

export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"
export XLA_PYTHON_CLIENT_PREALLOCATE=false  # so program memory / peak numbers mean something

# ---------------------------------------------------------------- 2. kernel tests on the GPU
# On a GPU backend the tests compile the Triton kernels (interpret only on CPU); TPU-interpreter
# tests are skipped there.
log "kernel tests (compiled for the GPU)"
timeout "${TEST_SECONDS:-240}" "$VPY" -m pytest -q -p no:cacheprovider tests/test_kernels.py -k "gpu or block_ranges or pairwise" \
  --junitxml "$OUT/junit.xml" > "$OUT/tests.txt" 2>&1
rc=$?
status_tests="$(tail -1 "$OUT/tests.txt") (exit $rc)"
[ $rc -eq 124 ] && status_tests="TIMED OUT after 240 s: $(grep -E 'passed|failed' "$OUT/tests.txt" | tail -1)"
log "tests: $status_tests"

# ---------------------------------------------------------------- 3a. the whole model, pallas vs xla
log "model check (Phi-3-mini-shaped, bf16: logits, gradients, generation; pallas vs xla)"
timeout "${MODEL_SECONDS:-150}" "$VPY" benchmarks/gpu_model_check.py > "$OUT/model_check.json" 2> "$OUT/model_check.err"
log "model check: exit $?"
tail -30 "$OUT/model_check.json" | tee -a "$OUT/log.txt"

# ---------------------------------------------------------------- 3. benchmark
log "benchmark (ours / xla / cudnn; fwd and fwd+bwd; seq 512..8192)"
timeout "${BENCH_SECONDS:-420}" "$VPY" benchmarks/bench_attention.py --max-seconds "${BENCH_BUDGET:-330}" --case-seconds 40 --repeats 10 \
  --json "$OUT/bench_attention.json" --markdown "$OUT/bench_attention.md" > "$OUT/bench.txt" 2>&1
rc=$?
status_bench="exit $rc"
[ $rc -eq 124 ] && status_bench="TIMED OUT after 420 s (partial rows in bench.txt)"
log "benchmark: $status_bench"

# ---------------------------------------------------------------- 4. summary
{
  echo "# GPU check: Pallas attention kernels"
  echo
  echo "- device: $(grep -m1 -E 'cuda|gpu' "$OUT/devices.txt" || echo '?')"
  echo "- install: $status_install"
  echo "- kernel tests: $status_tests"
  echo "- benchmark: $status_bench"
  echo "- total time: $(( $(date +%s) - START )) s"
  echo
  grep -E "^(FAILED|ERROR)" "$OUT/tests.txt" | head -20 | sed 's/^/    /'
  echo
  if [ -s "$OUT/bench_attention.md" ]; then cat "$OUT/bench_attention.md"; else tail -40 "$OUT/bench.txt"; fi
} > "$OUT/SUMMARY.md"
cat "$OUT/SUMMARY.md"
