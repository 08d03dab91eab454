#!/usr/bin/env bash
# Launch a training stage with the DeepSpeed launcher (pdsh/ssh to the hosts of a hostfile).
#
#   infra/launch/deepspeed.sh pretrain                                  # this node, all GPUs
#   HOSTFILE=infra/launch/hostfile infra/launch/deepspeed.sh pretrain   # every host listed (see hostfile.example)
#   HOSTFILE=... NODE_RANK=1 infra/launch/deepspeed.sh pretrain         # no ssh: the same line on each host
#
# With a hostfile, rank 0 runs on its first host, which is also the rendezvous (`MASTER_ADDR`, default: that host's
# name as written in the hostfile; `MASTER_PORT`, default 29500). The launcher reaches the other hosts over ssh
# (pdsh); with `NODE_RANK` set it starts only this host's ranks (`--no_ssh`), for clusters without ssh between nodes.
# The launcher exports RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and MASTER_PORT to each process; the stage sees
# them and runs as one rank (it never relaunches itself under a launcher).
set -euo pipefail
STAGE=${1:?usage: deepspeed.sh <pretrain|pretrain_highres|distill> [stage args...]}
shift
if [ -n "${HOSTFILE:-}" ]; then
  [ -f "$HOSTFILE" ] || { echo "deepspeed.sh: HOSTFILE=$HOSTFILE: no such file" >&2; exit 2; }
  HOSTFILE=$(realpath "$HOSTFILE")  # given from the caller's directory
fi
cd "$(dirname "$0")/../.."
ARGS=(--no_local_rank --master_port "${MASTER_PORT:-29500}")
if [ -n "${HOSTFILE:-}" ]; then
  FIRST_HOST=$(awk '!/^[[:space:]]*(#|$)/ {print $1; exit}' "$HOSTFILE")
  [ -n "$FIRST_HOST" ] || { echo "deepspeed.sh: $HOSTFILE lists no host" >&2; exit 2; }
  ARGS+=(--hostfile "$HOSTFILE" --master_addr "${MASTER_ADDR:-$FIRST_HOST}")
  if [ -n "${NODE_RANK:-}" ]; then
    ARGS+=(--no_ssh --node_rank "$NODE_RANK")
  fi
elif [ -n "${GPUS:-}" ]; then
  ARGS+=(--num_gpus "$GPUS")
fi
exec deepspeed "${ARGS[@]}" --module components "$STAGE" "$@"
