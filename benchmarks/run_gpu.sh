#!/usr/bin/env bash
# Every GPU benchmark of the project in one go, each under its own time limit, for one card (at most 10 minutes):
#
#   bash benchmarks/run_gpu.sh [OUT_DIR]          # default OUT_DIR: benchmarks/results
#   ONLY="backbone_dinov3_l16_timm train_step_l16_gram" bash benchmarks/run_gpu.sh OUT_DIR   # DINOv3's: ~4 minutes
#   STAGES=1 bash benchmarks/run_gpu.sh OUT_DIR   # then every pipeline stage once on the GPU (benchmarks/gpu_stages.py)
#
# Appends one JSON line per benchmark to OUT_DIR/results.jsonl ({"bench", "args", "rc", "seconds", "result"}) and
# every benchmark's stderr to OUT_DIR/log.txt. Order, most needed first: DINOv3's ViT-L/16 backbone beside timm's
# DINOv3 model holding the same weights (their features' parity first, then compiled blocks both), the DINOv3
# ViT-L/16 step with Gram anchoring beside the same step without it (as the continued-pretraining recipe: 256 px
# crops, a 512 px Gram teacher), the backbone of ViT-L/14 and ViT-g/14 beside timm's (same process, compiled blocks
# both), the full ViT-g/14 training step beside timm's backbone-only step, its profile (OUT_DIR/profile: trace and
# where the time goes), the step with packed crops and with the cuDNN attention backend (A/B against the first),
# the step fed by the real loader, the Mask2Former protocol's step at 896 px for ViT-L/14, the evaluation features.
# A benchmark that fails or runs out of time is recorded with its exit status and the rest still run. The run keeps
# within BUDGET_S seconds (default 600, counted from its start): a benchmark whose limit no longer fits is recorded
# as skipped ("rc": null, "skipped": why), so that a GPU lease of 15 minutes leaves room for a second try.
# PYTHON picks the interpreter (default: python3); ONLY="NAME ..." runs only the named benchmarks. Compiled kernels
# are cached (TORCHINDUCTOR_CACHE_DIR), so later benchmarks compile faster.
set -u
out=${1:-benchmarks/results}
py=${PYTHON:-python3}
budget=${BUDGET_S:-600}
mkdir -p "$out"
out=$(cd "$out" && pwd)
cd "$(dirname "$0")/.." || exit 1
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
world=$tmp/world

record() {  # record NAME ARGS RC SECONDS RESULT [SKIPPED]: one line of results.jsonl
    "$py" - "$@" >>"$out/results.jsonl" <<'EOF'
import json, sys
name, args, rc, seconds, result, *skipped = sys.argv[1:]
try:
    parsed = json.loads(result)
except ValueError:
    parsed = result[-2000:] or None
line = {"bench": name, "args": args, "rc": int(rc) if rc else None, "seconds": int(seconds), "result": parsed}
print(json.dumps(line | ({"skipped": skipped[0]} if skipped else {})))
EOF
    tail -n 1 "$out/results.jsonl"
}

bench() {  # bench NAME LIMIT_S SCRIPT ARGS...
    local name=$1 limit=$2 script=$3
    shift 3
    [[ -z ${ONLY:-} || " $ONLY " == *" $name "* ]] || return 0
    local start=$SECONDS result rc left=$((budget - SECONDS))
    if ((limit + 15 > left)); then  # its limit and the kill grace no longer fit the run's budget
        echo "== $name: skipped, ${left}s left of BUDGET_S=$budget" | tee -a "$out/log.txt"
        record "$name" "$*" "" 0 "" "budget: ${left}s left of ${budget}s, limit ${limit}s"
        return 0
    fi
    echo "== $name: $script $* (limit ${limit}s)" | tee -a "$out/log.txt"
    result=$(timeout -k 15 "$limit" "$py" "benchmarks/$script" "$@" 2>>"$out/log.txt")
    rc=$?
    record "$name" "$*" "$rc" "$((SECONDS - start))" "$result"
}

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee -a "$out/log.txt"
"$py" -c "import sys, torch; print(sys.version.split()[0], torch.__version__, torch.version.cuda)" | tee -a "$out/log.txt"
"$py" -c "from components.config import load_config; from components.synthetic import render_world as r; \
c = load_config('params.yaml'); r(c.synthetic, c.seed, '$world')" 2>>"$out/log.txt"


export TORCHINDUCTOR_CACHE_DIR=${TORCHINDUCTOR_CACHE_DIR:-$tmp/inductor}
g16=(--arch vit_giant2 --batch-per-gpu 16 --compile --steps 20 --repeats 3)
l16=(--arch dinov3_vitl16 --batch-per-gpu 16 --global-size 256 --local-size 112 --drop-path 0.1)
bench backbone_dinov3_l16_timm 120 backbone.py --arch dinov3_vitl16 --baseline timm --iters 20 --repeats 3
bench train_step_l16_gram 120 train_step.py "${l16[@]}" --gram --baseline no-gram --steps 10 --repeats 3
bench backbone_timm 120 backbone.py --arch vit_large vit_giant2 --baseline timm --iters 20 --repeats 3
bench train_step_g16_timm 150 train_step.py "${g16[@]}" --baseline timm
bench train_step_g16_profile 70 train_step.py "${g16[@]}" --steps 5 --repeats 1 --profile "$out/profile"
bench train_step_g16_packed 60 train_step.py "${g16[@]}" --pack-crops
bench train_step_g16_cudnn 60 train_step.py "${g16[@]}" --attention cudnn
bench train_step_g16_data 60 train_step.py "${g16[@]}" --repeats 1 --with-data --num-workers 12
bench m2f_train_l14_896 45 m2f_train.py --arch vit_large --device cuda --crop 896 --batch 4 --steps 6
bench eval_vit_large 45 eval_features.py --arch vit_large --device cuda --world "$world"

if [[ -n ${STAGES:-} ]]; then
    timeout -k 15 600 "$py" benchmarks/gpu_stages.py "$tmp/stages" >>"$out/stages.jsonl" 2>>"$out/log.txt"
    cat "$out/stages.jsonl"
fi
