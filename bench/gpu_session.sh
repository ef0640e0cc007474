#!/usr/bin/env bash
# One prepared device call for a session lent a GPU: build relprop._C for Hopper, run the
# test suite (the backend-parity and kernel tests then run on CUDA tensors), run the GPU
# benchmarks, and leave the raw logs, JSON, table and plot in $OUT for bench/results/.
#
#   run(command="RELPROP_COMMIT=<sha> bash bench/gpu_session.sh", carry=[".whl"], timeout_s=600)
#
# Packages the device image lacks (zennit, for the peer comparison) travel as wheels in .whl/:
#   echo /.whl/ >> .git/info/exclude; pip download --no-deps zennit==0.5.1 -d .whl
# Not yet run on a device (no session so far was lent one).
set -uo pipefail
out=${OUT:?OUT must name the folder that comes back}
export PYTHONUNBUFFERED=1 MAX_JOBS=${MAX_JOBS:-16}
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site
fi
{ nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
  python3 -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__)"
  echo "commit ${RELPROP_COMMIT:-unknown}"; date -u +%Y-%m-%dT%H:%M:%SZ; } | tee "$out/device.txt"
if ! RELPROP_BUILD_EXT=1 python3 -m pip install -q -e . --no-deps --no-build-isolation >"$out/build.log" 2>&1; then
  tail -30 "$out/build.log"; exit 1
fi
python3 -c "import relprop; print(relprop.backends())" | tee -a "$out/device.txt"
python3 -m pytest -q -m "not slow" tests -p no:cacheprovider >"$out/tests.log" 2>&1; tail -15 "$out/tests.log"
python3 -m pytest -q bench -k "vgg16 or resnet50 or memory" -p no:cacheprovider \
  --benchmark-json="$out/bench.json" >"$out/bench.log" 2>&1; tail -5 "$out/bench.log"
python3 bench/report.py "$out/bench.json" --out "$out/bench" && tail -60 "$out/bench.md"
