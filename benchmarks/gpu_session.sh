#!/usr/bin/env bash
# Issue 20's GPU checks in one go, for a session lent an NVIDIA GPU (docs/bench.md, "On a GPU").
#
#   bash benchmarks/gpu_session.sh                          every phase, in the order below
#   PHASES="env tests" bash benchmarks/gpu_session.sh       some of them
#   PHASES="env 7b" LAYERS=8 BUDGETS="64" bash benchmarks/gpu_session.sh
#
# Phases (each copies its results into $OUT as it ends, so a run cut short keeps what it finished):
#   env    the GPU, onnxruntime's providers, torch; stops unless onnxruntime offers CUDAExecutionProvider
#   tests  pytest -m gpu: bundle vs PyTorch on CUDA with and without CUDA graphs and the device-resident
#          cache, in-place cache writes, fused attention placed on CUDA, a float16 bundle
#   mini   bench --shape llava-1.5-mini on CUDA, float32: cuda bundles (fused attention) and migraphx
#          bundles (the same lowered static graphs without fuse-attention), each with and without CUDA
#          graphs, against PyTorch eager on the GPU
#   7b     bench --shape llava-1.5-7b in float16 (LAYERS decoder layers, default all 32; random weights):
#          cuda bundles with and without CUDA graphs against PyTorch eager (SDPA, float16) on the GPU,
#          TTFT and decode per token for full and BUDGETS (default 192 64). One configuration's bundles
#          are on disk at a time (a 32-layer float16 bundle is ~28 GB: prefill and step each hold the
#          decoder). TARGETS="cuda migraphx" adds the unfused bundles (needs ~56 GB of disk a configuration).
#
# Nothing here was run on a GPU when it was written: the durations are not known. Each device command may
# run 10 minutes at most; split the phases over several commands (PHASES=...) where one does not fit.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-gpu-results}
PHASES=${PHASES:-env tests mini 7b}
LAYERS=${LAYERS:-32}
BUDGETS=${BUDGETS:-192 64}
TARGETS=${TARGETS:-cuda}
REPEATS=${REPEATS:-5}
PY=${PYTHON:-python3}
WORK=${WORK:-/tmp/duet-gpu}
mkdir -p "$OUT" "$WORK"
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
log() { echo "[$(date +%H:%M:%S) +${SECONDS}s] $*" | tee -a "$OUT/session.log"; }

# Wheels carried in .whl/ (see /work/.library/device/README.md) go first on the path.
if compgen -G ".whl/*.whl" >/dev/null; then
    $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
        && export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
# duet-export without installing it: its package layout (passes/ and runtimes/ inside duet_export) as links.
rm -rf "$WORK/src" && mkdir -p "$WORK/src/duet_export"
for f in duet_export/*; do ln -s "$PWD/$f" "$WORK/src/duet_export/"; done
ln -s "$PWD/passes" "$WORK/src/duet_export/passes"
ln -s "$PWD/runtimes" "$WORK/src/duet_export/runtimes"
export PYTHONPATH=$WORK/src${PYTHONPATH:+:$PYTHONPATH}
CLI=("$PY" -m duet_export.cli)

phase() { [[ " $PHASES " == *" $1 "* ]]; }
keep() { # keep a bench folder's results: bench.md / bench.json under $OUT/<name>.*
    local dir=$1 name=$2
    for f in bench.md bench.json bench.png; do [ -f "$dir/$f" ] && cp "$dir/$f" "$OUT/$name.${f#bench.}"; done
}

if phase env; then
    log "env"
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/env.txt"
    $PY - <<'EOF' | tee -a "$OUT/env.txt"
import onnxruntime, torch, transformers, onnx, onnxscript, onnx_ir
print("onnxruntime", onnxruntime.__version__, onnxruntime.get_available_providers())
print("torch", torch.__version__, "cuda", torch.cuda.is_available(), torch.cuda.get_device_name(0) if torch.cuda.is_available() else "-")
print("transformers", transformers.__version__, "onnx", onnx.__version__, "onnxscript", onnxscript.__version__, "onnx-ir", onnx_ir.__version__)
EOF
    if ! grep -q CUDAExecutionProvider "$OUT/env.txt"; then
        log "onnxruntime offers no CUDAExecutionProvider here: carry onnxruntime-gpu (docs/bench.md, 'On a GPU')"
        exit 3
    fi
fi

if phase tests; then
    log "tests: pytest -m gpu"
    $PY -m pytest -q -m gpu tests/test_gpu.py -p no:cacheprovider 2>&1 | tee "$OUT/pytest-gpu.log"
    log "tests done (exit ${PIPESTATUS[0]})"
fi

if phase mini; then
    log "mini: llava-1.5-mini on CUDA, float32"
    "${CLI[@]}" bench --shape llava-1.5-mini --out "$WORK/mini" --provider cuda --target cuda --target migraphx \
        --cuda-graph --thread-pool no-spin --eager-device cuda --eager-omp passive --repeats "$REPEATS" --warmup 2 \
        --no-memory --no-overhead --no-sweep 2>&1 | tee "$OUT/mini.log"
    keep "$WORK/mini" mini
    log "mini done"
fi

if phase 7b; then
    log "7b: llava-1.5-7b geometry, $LAYERS decoder layers, float16, budgets $BUDGETS, targets $TARGETS"
    args=()
    for b in $BUDGETS; do args+=(--budget "$b"); done
    for t in $TARGETS; do args+=(--target "$t"); done
    "${CLI[@]}" bench --shape llava-1.5-7b --layers "$LAYERS" --out "$WORK/7b" --provider cuda --dtype float16 \
        "${args[@]}" --cuda-graph --thread-pool no-spin --eager-device cuda --eager-omp passive --repeats "$REPEATS" --warmup 2 \
        --discard-bundles --no-memory --no-overhead --no-sweep 2>&1 | tee "$OUT/7b.log"
    keep "$WORK/7b" "7b-${LAYERS}l"
    log "7b done"
fi
log "all phases done: $PHASES"
