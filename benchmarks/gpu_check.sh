#!/usr/bin/env bash
# The GPU check: one command, about 8 minutes on one H200, run from the repository root with that
# machine's own python3 and torch (src/ goes on PYTHONPATH; nothing is installed there).
#
#   bash benchmarks/gpu_check.sh [OUT]          # tables and logs under OUT (default: $OUT, else gpu-check)
#
# Packages the machine lacks travel as wheels in .whl/ (installed into /tmp/site when that folder
# exists): pycocotools, segmentation-models-pytorch and mlxtend for the training commands, and timm
# when the machine's is older than pyproject.toml's floor. A checkout of the official DAT code in
# .official/DAT (with .official/dat_official_v1_configs.yaml) adds the official DAT-T to the bench.
# docs/benchmarks.md ("GPU check") says how to prepare both and what each step prints.
#
# Steps, each under its own time limit so that one slow step cannot take the others' time:
#   1. versions and the GPU;  2. CUDA against CPU logits (dat_tiny, eapt_small, datpp_tiny);
#   3. deformvit bench --device cuda, bf16 and fp32, inference and training, batch 128, peak memory,
#      against Swin-T, ConvNeXt-T, DeiT-S, PVTv2-B2 (and the official DAT-T);  4. dat_tiny and Swin-T
#      compiled (bf16), inference and training apart;  5. the top kernels of one dat_tiny bf16 training step;
#   6. a short CUDA run of train, detect train and segment train.
# SMOKE=1 runs every step on the CPU with tiny sizes, to check the script itself.
set -uo pipefail
OUT_DIR=${1:-${OUT:-gpu-check}}
mkdir -p "$OUT_DIR"
PY=${PYTHON:-python3}
if [ -d .whl ] && ls .whl/*.whl >/dev/null 2>&1; then
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
        && export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
DEVICE=cuda BATCH=128 REPEATS=10 PARITY_BATCH=2 SIZE=224 ITERATIONS=20 LIMIT=1
COMPILED=dat_tiny COMPILED_REFERENCES=swin_tiny_patch4_window7_224
if [ "${SMOKE:-0}" = 1 ]; then  # compiling on a CPU takes minutes a model: a small one stands in
    DEVICE=cpu BATCH=2 REPEATS=1 PARITY_BATCH=1 SIZE=64 ITERATIONS=2 LIMIT=4 COMPILED=dat_nano COMPILED_REFERENCES=none
fi
REFERENCES="swin_tiny_patch4_window7_224 convnext_tiny deit_small_patch16_224 pvt_v2_b2"
OFFICIAL=()
if [ -f .official/DAT/models/dat.py ] && [ -f .official/dat_official_v1_configs.yaml ]; then
    OFFICIAL=(--official-repo .official/DAT --configs .official/dat_official_v1_configs.yaml)
fi

step() {  # step NAME SECONDS COMMAND...: run COMMAND under a limit, its output on screen and in OUT/NAME.log
    local name=$1 seconds=$(( $2 * LIMIT )); shift 2
    echo "== $name (limit ${seconds}s): $*"
    local start=$SECONDS
    timeout --kill-after=10 "$seconds" "$@" 2>&1 | tee "$OUT_DIR/$name.log"
    local status=${PIPESTATUS[0]}
    echo "== $name: exit $status after $(( SECONDS - start ))s" | tee -a "$OUT_DIR/summary.log"
}

step versions 20 bash -c "nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>/dev/null; \
    $PY -c 'import sys, torch, torchvision, timm; print(sys.version.split()[0], torch.__version__, torch.version.cuda, \
    torchvision.__version__, timm.__version__, torch.cuda.is_available())'"
step parity 45 "$PY" benchmarks/gpu_check.py parity --out "$OUT_DIR" --device "$DEVICE" --batch "$PARITY_BATCH" \
    --size "$SIZE"
step bench 130 "$PY" benchmarks/speed.py --device "$DEVICE" --models dat_tiny eapt_small datpp_tiny \
    --references $REFERENCES "${OFFICIAL[@]}" --precision bf16 fp32 --mode both --batch "$BATCH" --size "$SIZE" \
    --warmup 2 --repeats "$REPEATS" --csv "$OUT_DIR/bench.csv" --markdown "$OUT_DIR/bench.md"
for mode in infer train; do  # apart, so that a slow compilation of one mode leaves the other's table
    step "bench_compiled_$mode" 60 "$PY" benchmarks/speed.py --device "$DEVICE" --models $COMPILED \
        --references $COMPILED_REFERENCES --precision bf16 --mode "$mode" --batch "$BATCH" --size "$SIZE" \
        --compile --warmup 1 --repeats "$REPEATS" --no-memory --csv "$OUT_DIR/bench_compiled_$mode.csv" \
        --markdown "$OUT_DIR/bench_compiled_$mode.md"
done
step profile 40 "$PY" benchmarks/gpu_check.py profile --out "$OUT_DIR" --device "$DEVICE" --batch "$BATCH" \
    --size "$SIZE" --precision bf16
RUNS=$(mktemp -d)
step train 30 "$PY" -m deformvit train --device "$DEVICE" --set iterations="$ITERATIONS" \
    --workers 2 --output "$RUNS/classify"
step detect_train 45 "$PY" -m deformvit detect train --device "$DEVICE" --set iterations="$ITERATIONS" \
    --workers 2 --output "$RUNS/detect"
step segment_train 45 "$PY" -m deformvit segment train --device "$DEVICE" \
    --set iterations="$ITERATIONS" --workers 2 --output "$RUNS/segment"
echo "== done; tables and logs in $OUT_DIR"
cat "$OUT_DIR/summary.log"
