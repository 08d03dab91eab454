#!/usr/bin/env bash
# Launch a training stage with torchrun: one node (default) or several with a c10d rendezvous.
#
#   infra/launch/torchrun.sh pretrain                       # all GPUs of this node
#   NNODES=4 RDZV_ENDPOINT=node0:29500 infra/launch/torchrun.sh pretrain   # run the same line on each node
#   GPUS=2 infra/launch/torchrun.sh pretrain_highres
#
# Every rank runs `python -m components <stage>` with the paths of dvc.yaml; rank 0 alone logs to MLflow and writes
# the exports. Extra arguments go to the stage (e.g. --params my.yaml). Set train.nproc_per_node: 1 in the params
# used here (the launcher, not the stage, starts the processes).
set -euo pipefail
STAGE=${1:?usage: torchrun.sh <pretrain|pretrain_highres> [stage args...]}
shift
cd "$(dirname "$0")/../.."
GPUS=${GPUS:-$(python -c 'import torch; print(max(torch.cuda.device_count(), 1))')}
NNODES=${NNODES:-1}
RDZV=()
if [ "$NNODES" -gt 1 ]; then
  RDZV=(--rdzv-backend=c10d --rdzv-endpoint="${RDZV_ENDPOINT:?set RDZV_ENDPOINT=host:port of one node}"
        --rdzv-id="${RDZV_ID:-dinov2-$STAGE}")
else
  RDZV=(--standalone)
fi
exec python -m torch.distributed.run --nnodes="$NNODES" --nproc-per-node="$GPUS" "${RDZV[@]}" \
  -m components "$STAGE" "$@"
