#!/usr/bin/env bash
# Every GPU benchmark of the project in one go, each under its own time limit, for one card:
#
#   bash benchmarks/run_gpu.sh [OUT_DIR]          # default OUT_DIR: benchmarks/results
#
# Appends one JSON line per benchmark to OUT_DIR/results.jsonl ({"bench", "args", "rc", "seconds", "result"}) and
# every benchmark's stderr to OUT_DIR/log.txt. Order: the same-card baseline of the release's model code first, then
# this project's backbone (compiled blocks), the full training step of ViT-g/14, the evaluation stage for ViT-L/14
# and ViT-g/14, the ViT-g/14 step with compiled blocks, the backbone without compilation, the ViT-L/14 step, then the
# Mask2Former segmentation protocol's training step at the paper's 896 px crops for ViT-L/14 and ViT-g/14. A
# benchmark that fails or runs out of time is recorded with its exit status and the rest still run. PYTHON picks
# the interpreter (default: python3); ONLY="NAME ..." runs only the named benchmarks.
set -u
out=${1:-benchmarks/results}
py=${PYTHON:-python3}
mkdir -p "$out"
out=$(cd "$out" && pwd)
cd "$(dirname "$0")/.." || exit 1
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
world=$tmp/world

bench() {  # bench NAME LIMIT_S SCRIPT ARGS...
    local name=$1 limit=$2 script=$3
    shift 3
    [[ -z ${ONLY:-} || " $ONLY " == *" $name "* ]] || return 0
    local start=$SECONDS result rc
    echo "== $name: $script $* (limit ${limit}s)" | tee -a "$out/log.txt"
    result=$(timeout -k 15 "$limit" "$py" "benchmarks/$script" "$@" 2>>"$out/log.txt")
    rc=$?
    "$py" - "$name" "$*" "$rc" "$((SECONDS - start))" "$result" >>"$out/results.jsonl" <<'EOF'
import json, sys
name, args, rc, seconds, result = sys.argv[1:]
try:
    parsed = json.loads(result)
except ValueError:
    parsed = result[-2000:] or None
print(json.dumps({"bench": name, "args": args, "rc": int(rc), "seconds": int(seconds), "result": parsed}))
EOF
    tail -n 1 "$out/results.jsonl"
}

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee -a "$out/log.txt"
"$py" -c "import sys, torch; print(sys.version.split()[0], torch.__version__, torch.version.cuda)" | tee -a "$out/log.txt"
"$py" -c "from components.config import load_config; from components.synthetic import render_world as r; \
c = load_config('params.yaml'); r(c.synthetic, c.seed, '$world')" 2>>"$out/log.txt"

bench backbone_release_eager 120 backbone.py --arch vit_large vit_giant2 --attention naive --no-compile --iters 10
bench backbone_compiled 200 backbone.py --arch vit_large vit_giant2 --iters 10
bench train_step_g16_eager 150 train_step.py --arch vit_giant2 --batch-per-gpu 16 --steps 8
bench eval_vit_large 150 eval_features.py --arch vit_large --device cuda --world "$world"
bench eval_vit_giant2 200 eval_features.py --arch vit_giant2 --device cuda --world "$world"
bench train_step_g16_compiled 200 train_step.py --arch vit_giant2 --batch-per-gpu 16 --steps 8 --compile
bench backbone_eager 100 backbone.py --arch vit_large vit_giant2 --no-compile --iters 10
bench train_step_l32_compiled 150 train_step.py --arch vit_large --batch-per-gpu 32 --steps 8 --compile
bench m2f_train_l14_896 180 m2f_train.py --arch vit_large --device cuda --crop 896 --batch 4 --steps 6
bench m2f_train_g14_896 240 m2f_train.py --arch vit_giant2 --device cuda --crop 896 --batch 2 --steps 6
