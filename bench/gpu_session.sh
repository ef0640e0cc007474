#!/usr/bin/env bash
# The prepared device calls of a session lent a GPU (15 minutes of device time in all, one
# start of a minute or two included).  Two calls, each ending inside its own deadline with
# whatever it has finished written to $OUT; make the second while the machine is still warm:
#
#   run(command="RELPROP_COMMIT=<sha> bash bench/gpu_session.sh check", timeout_s=480)
#       device + measured ceilings, relprop._C built for sm_90 (in the background, while the
#       Triton kernel tests run compiled on CUDA tensors), the whole suite with the GPU
#       visible (backend parity and extension tests on CUDA), each kernel against its floor.
#   run(command="RELPROP_COMMIT=<sha> bash bench/gpu_session.sh bench", carry=[".whl"], timeout_s=480)
#       throughput and peak memory, VGG16 and ResNet50 at batch 1/8/64, beside the gradient
#       pass and Zennit, and the markdown report.
#
# Zennit and Captum travel as wheels in .whl/ (the device image lacks them and has no
# network; it has their own needs): `make gpu-wheels` here first.
# Never yet run on a device (no session so far was lent one); the device image's torch,
# Triton and numpy (2.11 / 3.6 / 2.5 when last read) were checked against the suite on CPU.
set -uo pipefail
phase=${1:?usage: gpu_session.sh check|bench}
out=${OUT:?OUT must name the folder that comes back}
deadline=$(( $(date +%s) + ${BUDGET_S:-450} ))
left() { local s=$(( deadline - $(date +%s) - ${1:-0} )); echo $(( s > 10 ? s : 10 )); }
export PYTHONUNBUFFERED=1 MAX_JOBS=${MAX_JOBS:-16}
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site
fi
# relprop itself, editable (maps relprop.kernels to kernels/), without compiling anything.
RELPROP_BUILD_EXT=0 python3 -m pip install -q -e . --no-deps --no-build-isolation >"$out/install.log" 2>&1 \
  || { tail -20 "$out/install.log"; exit 1; }
timeout_opt=$(python3 -c "import pytest_timeout" 2>/dev/null && echo "--timeout=120")

if [ "$phase" = check ]; then
  { nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.max.sm --format=csv,noheader
    python3 -c "import torch, triton, numpy; print('torch', torch.__version__, 'cuda', torch.version.cuda,
'triton', triton.__version__, 'numpy', numpy.__version__)"
    echo "commit ${RELPROP_COMMIT:-unknown}"; date -u +%Y-%m-%dT%H:%M:%SZ; } | tee "$out/device.txt"
  # relprop._C in place (relprop/_C.*.so), in the background while Triton compiles its kernels.
  ( RELPROP_BUILD_EXT=1 timeout 300 python3 setup.py -q build_ext --inplace >"$out/build.log" 2>&1;
    echo "build exit $?" >>"$out/build.log" ) &
  build=$!
  timeout "$(left 300)" python3 -m pytest -q tests/test_triton_kernels.py tests/test_primitives.py -k triton \
    -p no:cacheprovider $timeout_opt >"$out/tests.log" 2>&1
  echo "== Triton kernels on CUDA: $(tail -1 "$out/tests.log")"
  wait $build; tail -3 "$out/build.log"
  python3 -c "import relprop; [print(k, v) for k, v in relprop.backends().items()]" | tee -a "$out/device.txt"
  # What auto will trust: each fast backend's self-check per primitive and dtype on the GPU.
  timeout 60 relprop backends --check >"$out/self-check.txt" 2>&1; echo "== self-check exit $?"
  grep -E "^[a-z]+ |cuda (float|bfloat)" "$out/self-check.txt"
  # Everything else, the GPU visible; the CPU-bound majority spread over 8 workers.
  timeout "$(left 150)" python3 -m pytest -q tests -n 8 --ignore=tests/test_triton_kernels.py -p no:cacheprovider \
    $timeout_opt >>"$out/tests.log" 2>&1
  echo "== whole suite: $(tail -1 "$out/tests.log")"
  timeout "$(left 5)" python3 bench/kernel_floor.py --out "$out/floor" >"$out/floor.log" 2>&1
  echo "== kernels against their floors (floor.md):"; tail -n 70 "$out/floor.md" 2>/dev/null || tail -20 "$out/floor.log"
elif [ "$phase" = bench ]; then
  [ -n "$(ls relprop/_C*.so 2>/dev/null)" ] || RELPROP_BUILD_EXT=1 timeout 300 python3 setup.py -q build_ext --inplace \
    >"$out/build.log" 2>&1
  python3 -c "import relprop; print(relprop.backends())"
  # The cases with speed goals (issue 6), b64 groups first, one pytest run per model.  Each
  # skips the cases it has not started by its soft deadline (RELPROP_BENCH_DEADLINE, so it
  # still writes its JSON); `timeout` 40 s later is the hard stop.
  pick="not small and not clrp and not sglrp and not rap-repo"
  n=0
  for model in vgg16 resnet50; do
    n=$(( n + 1 ))
    soft=$(( $(date +%s) + $(left $(( (2 - n) * 200 + 80 ))) ))
    RELPROP_BENCH_DEADLINE=$soft timeout "$(left $(( (2 - n) * 200 + 40 )))" python3 -m pytest -q \
      bench/test_throughput.py -p no:cacheprovider -k "$model and $pick" $timeout_opt \
      --benchmark-json="$out/bench-$model.json" >"$out/bench.log" 2>&1
    echo "== $model: $(tail -1 "$out/bench.log")"
  done
  # Peak CUDA memory per method at batch 64 (issue 17), a fresh process per case.
  timeout "$(left 5)" python3 bench/memory.py --device cuda --batch 64 --deadline $(( $(date +%s) + $(left 40) )) \
    --cases gradient relprop:gradient relprop:lrp-epsilon-plus-flat relprop:lrp-epsilon-alpha2beta1-flat \
    relprop:rap relprop:rsp relprop:ae zennit:EpsilonPlusFlat --out "$out/memory-cuda" >>"$out/bench.log" 2>&1
  python3 bench/report.py "$out"/bench-*.json --commit "${RELPROP_COMMIT:-unknown}" --out "$out/bench" \
    && tail -n 80 "$out/bench.md"
else
  echo "unknown phase $phase (check or bench)"; exit 2
fi
