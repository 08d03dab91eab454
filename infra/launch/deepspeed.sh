#!/usr/bin/env bash
# Launch a training stage with the DeepSpeed launcher (pdsh/ssh to the hosts of a hostfile).
#
#   infra/launch/deepspeed.sh pretrain                              # this node, all GPUs
#   HOSTFILE=infra/launch/hostfile infra/launch/deepspeed.sh pretrain   # every host listed (see hostfile.example)
#
# The launcher exports RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and MASTER_PORT to each process; the stage sees
# them and runs as one rank (it never relaunches itself under a launcher).
set -euo pipefail
STAGE=${1:?usage: deepspeed.sh <pretrain|pretrain_highres> [stage args...]}
shift
cd "$(dirname "$0")/../.."
ARGS=(--no_local_rank --master_port "${MASTER_PORT:-29500}")
if [ -n "${HOSTFILE:-}" ]; then
  ARGS+=(--hostfile "$HOSTFILE")
elif [ -n "${GPUS:-}" ]; then
  ARGS+=(--num_gpus "$GPUS")
fi
exec deepspeed "${ARGS[@]}" --module components "$STAGE" "$@"
