#!/usr/bin/env bash
# Start the SGLang rollout servers of one rollout node (GPU), for examples/pr2/train_qwen_moe.sh.
#
# Run it on each rollout node before the trainer starts:
#   HF_CKPT=/shared/Qwen3-30B-A3B bash examples/pr2/launch_sglang_servers.sh
# It starts GPUS_PER_NODE / SGLANG_TP servers, server i on GPUs [i*SGLANG_TP, (i+1)*SGLANG_TP)
# and port SGLANG_BASE_PORT + i, each with --enable-return-routed-experts (R3 / PR2-engine need
# the routed expert ids of every token), waits until each answers /health, and prints the line
#   SGLANG_URLS=http://<host>:<port>,...
# Join the lines of all rollout nodes with commas and pass them to train_qwen_moe.sh.
# The trainer sends token ids (--skip-tokenizer-init) and pushes its weights after every rollout
# batch in memory (--weight-sync distributed: an NCCL broadcast group per pipeline stage with the
# servers' GPUs, so the servers must reach the training nodes; --weight-sync disk instead has
# them reload the trainer's --save directory, which they must then see).
# SGLANG_PYTHON must have sglang==0.5.23 (the version the weight sync needs: update sessions,
# flattened-bucket broadcasts, routed experts; tools/sglang_env.sh pins the same); the script
# refuses another version before starting anything.
#
#   --dry-run   print the server commands and URLs, start nothing
#   --stop      stop the servers this script started on this node (pid files in LOG_DIR)
#   --sglang-api-key KEY   the key every server requires (else $SGLANG_API_KEY, else a new
#               random key): the weight-update endpoints replace the policy, so no server
#               starts without one. A generated key is written to $LOG_DIR/sglang_api_key
#               (mode 600); give the trainer the same key (SGLANG_API_KEY or SGLANG_API_KEY_FILE
#               for train_qwen_moe.sh) and use one key for the servers of all rollout nodes.
#               The key reaches SGLang's --api-key in-process, never on a command line.
#
# Environment (defaults in brackets):
#   HF_CKPT           checkpoint to serve (required)
#   GPUS_PER_NODE [8] SGLANG_TP [2: Qwen3-30B-A3B in bf16 needs ~61 GB of weights]
#   SGLANG_BASE_PORT [30000]  SGLANG_HOST [0.0.0.0]  SGLANG_ADVERTISE_HOST [$(hostname -f)]
#   SGLANG_MEM_FRACTION [0.85]  SGLANG_EXTRA_ARGS  more sglang.launch_server flags
#   SGLANG_PYTHON [python]    the interpreter of SGLang's GPU environment
#   LOG_DIR [./sglang_logs]   SGLANG_STARTUP_TIMEOUT [1800] seconds
set -euo pipefail

die() { echo "error: $*" >&2; exit 1; }

mode=launch
api_key="${SGLANG_API_KEY:-}"
while (( $# )); do
  case "$1" in
    --dry-run) mode=dry-run ;;
    --stop) mode=stop ;;
    --sglang-api-key) shift; api_key="${1:-}"; [ -n "$api_key" ] || die "--sglang-api-key needs a value" ;;
    -h|--help) sed -n '2,/^set -euo/p' "${BASH_SOURCE[0]}" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
    *) die "unknown argument '$1' (expected --dry-run, --stop, --sglang-api-key KEY or --help)" ;;
  esac
  shift
done

GPUS_PER_NODE="${GPUS_PER_NODE:-8}"
SGLANG_TP="${SGLANG_TP:-2}"
SGLANG_BASE_PORT="${SGLANG_BASE_PORT:-30000}"
SGLANG_HOST="${SGLANG_HOST:-0.0.0.0}"
SGLANG_ADVERTISE_HOST="${SGLANG_ADVERTISE_HOST:-$(hostname -f 2>/dev/null || hostname)}"
SGLANG_MEM_FRACTION="${SGLANG_MEM_FRACTION:-0.85}"
SGLANG_PYTHON="${SGLANG_PYTHON:-python}"
SGLANG_STARTUP_TIMEOUT="${SGLANG_STARTUP_TIMEOUT:-1800}"
LOG_DIR="${LOG_DIR:-./sglang_logs}"
SGLANG_VERSION=0.5.23  # = SGLANG_VERSION in megatron_pr2/rollout/sglang_weight_api.py
read -r -a extra_args <<< "${SGLANG_EXTRA_ARGS:-}"

for name in GPUS_PER_NODE SGLANG_TP SGLANG_BASE_PORT SGLANG_STARTUP_TIMEOUT; do
  [[ "${!name}" =~ ^[1-9][0-9]*$ ]] || die "$name must be a positive integer, got '${!name}'"
done
(( GPUS_PER_NODE % SGLANG_TP == 0 )) || die "GPUS_PER_NODE=$GPUS_PER_NODE is not divisible by SGLANG_TP=$SGLANG_TP"
num_servers=$(( GPUS_PER_NODE / SGLANG_TP ))

if [ "$mode" = stop ]; then
  shopt -s nullglob
  for pid_file in "$LOG_DIR"/sglang_*.pid; do
    pid="$(cat "$pid_file")"
    # each server was started as the leader of its own process group: end that group only
    if kill -0 "$pid" 2>/dev/null; then kill -- "-$pid" && echo "stopped server pid $pid"; fi
    rm -f "$pid_file"
  done
  exit 0
fi

if [ "$mode" = launch ]; then
  have="$("$SGLANG_PYTHON" -c 'import importlib.metadata as m; print(m.version("sglang"))' 2>/dev/null)" \
    || die "SGLANG_PYTHON=$SGLANG_PYTHON has no sglang: install sglang==$SGLANG_VERSION in SGLang's GPU environment"
  [ "$have" = "$SGLANG_VERSION" ] \
    || die "SGLANG_PYTHON=$SGLANG_PYTHON has sglang $have; the trainer's weight sync needs sglang==$SGLANG_VERSION (pip install 'sglang==$SGLANG_VERSION')"
fi
[ "$mode" = dry-run ] || [ -f "${HF_CKPT:-}/config.json" ] || die "set HF_CKPT to a Hugging Face checkpoint directory (config.json not found in '${HF_CKPT:-}')"

# SGLang's entry point with --api-key taken from the environment, so the key stays off `ps`.
launch_with_key='import os, runpy, sys; sys.argv += ["--api-key", os.environ["SGLANG_API_KEY"]]; runpy.run_module("sglang.launch_server", run_name="__main__")'

server_command() {  # $1 = server index; sets the array server_cmd
  server_cmd=("$SGLANG_PYTHON" -c "$launch_with_key"
    --model-path "${HF_CKPT:-/path/to/Qwen3-30B-A3B}"
    --host "$SGLANG_HOST" --port "$(( SGLANG_BASE_PORT + $1 ))" --tp-size "$SGLANG_TP"
    --dtype bfloat16 --mem-fraction-static "$SGLANG_MEM_FRACTION" --skip-tokenizer-init
    --enable-return-routed-experts ${extra_args[@]+"${extra_args[@]}"})
}

gpu_list() {  # $1 = server index -> "0,1"
  local first=$(( $1 * SGLANG_TP )) gpus=() g
  for (( g = first; g < first + SGLANG_TP; g++ )); do gpus+=("$g"); done
  local IFS=,; echo "${gpus[*]}"
}

urls=()
for (( i = 0; i < num_servers; i++ )); do
  urls+=("http://$SGLANG_ADVERTISE_HOST:$(( SGLANG_BASE_PORT + i ))")
done
joined="$(IFS=,; echo "${urls[*]}")"

if [ "$mode" = dry-run ]; then
  for (( i = 0; i < num_servers; i++ )); do
    server_command "$i"
    echo "would run: CUDA_VISIBLE_DEVICES=$(gpu_list "$i") $(printf '%q ' "${server_cmd[@]}")"
  done
  echo "SGLANG_URLS=$joined"
  exit 0
fi

mkdir -p "$LOG_DIR"
if [ -z "$api_key" ]; then
  api_key="$("$SGLANG_PYTHON" -c 'import secrets; print(secrets.token_hex(24))')"
  (umask 077; echo "$api_key" > "$LOG_DIR/sglang_api_key")
  echo "generated an API key for this run: $LOG_DIR/sglang_api_key (SGLANG_API_KEY_FILE for the trainer)"
fi
export SGLANG_API_KEY="$api_key"
for (( i = 0; i < num_servers; i++ )); do
  port=$(( SGLANG_BASE_PORT + i ))
  server_command "$i"
  # setsid: the server leads its own process group, so --stop ends its whole tree and nothing else
  CUDA_VISIBLE_DEVICES="$(gpu_list "$i")" setsid "${server_cmd[@]}" > "$LOG_DIR/sglang_$port.log" 2>&1 &
  echo "$!" > "$LOG_DIR/sglang_$port.pid"
  echo "started server $i on GPUs $(gpu_list "$i"), port $port (log $LOG_DIR/sglang_$port.log)"
done

deadline=$(( $(date +%s) + SGLANG_STARTUP_TIMEOUT ))
for (( i = 0; i < num_servers; i++ )); do
  port=$(( SGLANG_BASE_PORT + i ))
  until curl -sf "http://127.0.0.1:$port/health" >/dev/null; do
    kill -0 "$(cat "$LOG_DIR/sglang_$port.pid")" 2>/dev/null || die "server on port $port exited; see $LOG_DIR/sglang_$port.log"
    (( $(date +%s) < deadline )) || die "server on port $port not healthy after ${SGLANG_STARTUP_TIMEOUT}s; see $LOG_DIR/sglang_$port.log"
    sleep 5
  done
  echo "server on port $port is healthy"
done
echo "SGLANG_URLS=$joined"
