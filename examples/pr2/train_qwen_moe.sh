#!/usr/bin/env bash
# Multi-node H100 recipe: RL on Qwen3-30B-A3B with PR2 (or none/R2/R3/PR2-engine) routing.
#
# Run it on every training node (same environment, different NODE_RANK):
#   NNODES=2 NODE_RANK=0 MASTER_ADDR=node0 HF_CKPT=/shared/Qwen3-30B-A3B DATA=/shared/math.jsonl \
#   SGLANG_URLS=http://rollout0:30000,http://rollout0:30001 OUTPUT=/shared/runs/pr2 \
#     bash examples/pr2/train_qwen_moe.sh [--dry-run] [extra trainer flags ...]
#
# Steps:
#   0. SGLang servers run on separate rollout GPUs, started beforehand on each rollout node with
#      examples/pr2/launch_sglang_servers.sh (--enable-return-routed-experts); it prints the
#      SGLANG_URLS value to use here.
#   1. every node validates the whole configuration (as --dry-run does) and stops on errors.
#   2. node 0 converts HF_CKPT to a Megatron torch_dist checkpoint in $OUTPUT/megatron_ckpt
#      (tools/convert.py hf-to-megatron, once; skipped when $OUTPUT/megatron_ckpt.converted
#      exists); the other nodes wait for that marker.
#   3. each node checks its runtime (inputs, CUDA, GPU count, TransformerEngine, FP8), then runs
#      `torchrun ... -m megatron_pr2.train --config examples/pr2/qwen3_30b_a3b.yaml ...`,
#      logging to $OUTPUT/logs and TensorBoard to $OUTPUT/tensorboard.
# OUTPUT must be on a filesystem shared by all training nodes (the converted checkpoint, its
# marker, checkpoints). After every rollout batch the trainer pushes its weights to the SGLang
# servers in memory (--weight-sync distributed): each pipeline stage's first GPU broadcasts its
# stage over an NCCL group with the servers' GPUs, the stages one after another. The servers must
# reach every training node; each pushing rank offers its address on the route to the servers
# (set MEGATRON_PR2_WEIGHT_SYNC_ADDR per node to override). With `--weight-sync disk` the servers
# reload $OUTPUT/checkpoints/weight_sync_hf instead and must see that filesystem.
#
# --dry-run does everything except launching, on any machine (CPU only is fine): it validates the
# whole configuration with `python -m megatron_pr2.preflight.validate` for NNODES x GPUS_PER_NODE GPUs,
# prints a summary and the commands it would run, and exits non-zero naming any problem. Unset
# paths are replaced by placeholders, and without HF_CKPT the embedded Qwen3-30B-A3B config
# (examples/pr2/configs/qwen3_30b_a3b_config.json) stands in for the checkpoint's.
#
# Environment (defaults in brackets):
#   NNODES [2] NODE_RANK [0] MASTER_ADDR [127.0.0.1] MASTER_PORT [29500] GPUS_PER_NODE [8]
#   HF_CKPT      Hugging Face Qwen3-30B-A3B directory (config.json, safetensors, tokenizer)
#   DATA         JSONL/parquet prompt+answer file (answers checked by math-verify)
#   SGLANG_URLS  comma-separated http://host:port of the SGLang servers
#   SGLANG_API_KEY or SGLANG_API_KEY_FILE (or --sglang-api-key KEY)  the key the servers require
#                (launch_sglang_servers.sh writes a generated one to $LOG_DIR/sglang_api_key);
#                the trainer reads it from SGLANG_API_KEY, never from its saved config
#   OUTPUT       run directory [./outputs/qwen3_30b_a3b_$METHOD]
#   METHOD       routing method: none | r2 | r3 | pr2 | pr2-engine [pr2]
#   FP8          1: FP8 (e4m3) TransformerEngine GEMMs, experts included [0]
#   OFF_POLICY_WINDOW, PREDICTOR_LR_MULT, TP, PP, EP, ETP, VPP   override the YAML when set
#   CONFIG       trainer YAML [examples/pr2/qwen3_30b_a3b.yaml]
#   PYTHON       interpreter with megatron_pr2 installed [python]
#   CONVERT_WAIT_SECONDS  how long nodes > 0 wait for node 0's conversion [7200]
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
repo="$(cd "$here/../.." && pwd)"

usage() { sed -n '2,/^set -euo/p' "${BASH_SOURCE[0]}" | sed '$d; s/^# \{0,1\}//'; }
die() { echo "error: $*" >&2; exit 1; }

dry_run=0
extra=()
while (( $# )); do
  case "$1" in
    --dry-run) dry_run=1 ;;
    --sglang-api-key) shift; SGLANG_API_KEY="${1:-}"; [ -n "$SGLANG_API_KEY" ] || die "--sglang-api-key needs a value" ;;
    -h|--help) usage; exit 0 ;;
    *) extra+=("$1") ;;
  esac
  shift
done
if [ -z "${SGLANG_API_KEY:-}" ] && [ -n "${SGLANG_API_KEY_FILE:-}" ]; then
  [ -r "$SGLANG_API_KEY_FILE" ] || die "SGLANG_API_KEY_FILE=$SGLANG_API_KEY_FILE is not readable"
  SGLANG_API_KEY="$(head -n 1 "$SGLANG_API_KEY_FILE")"
fi

PYTHON="${PYTHON:-python}"
NNODES="${NNODES:-2}"
NODE_RANK="${NODE_RANK:-0}"
MASTER_ADDR="${MASTER_ADDR:-127.0.0.1}"
MASTER_PORT="${MASTER_PORT:-29500}"
GPUS_PER_NODE="${GPUS_PER_NODE:-8}"
METHOD="${METHOD:-pr2}"
FP8="${FP8:-0}"
CONFIG="${CONFIG:-$here/qwen3_30b_a3b.yaml}"
OUTPUT="${OUTPUT:-$repo/outputs/qwen3_30b_a3b_$METHOD}"
CONVERT_WAIT_SECONDS="${CONVERT_WAIT_SECONDS:-7200}"
EMBEDDED_HF_CONFIG="$here/configs/qwen3_30b_a3b_config.json"

# ------------------------------------------------------------------------------ environment checks
for name in NNODES GPUS_PER_NODE MASTER_PORT CONVERT_WAIT_SECONDS; do
  [[ "${!name}" =~ ^[1-9][0-9]*$ ]] || die "$name must be a positive integer, got '${!name}'"
done
[[ "$NODE_RANK" =~ ^[0-9]+$ ]] || die "NODE_RANK must be a non-negative integer, got '$NODE_RANK'"
(( NODE_RANK < NNODES )) || die "NODE_RANK=$NODE_RANK must be below NNODES=$NNODES"
[[ "$FP8" == 0 || "$FP8" == 1 ]] || die "FP8 must be 0 or 1, got '$FP8'"
[ -f "$CONFIG" ] || die "CONFIG=$CONFIG does not exist"
command -v "$PYTHON" >/dev/null || die "PYTHON=$PYTHON is not an executable (set PYTHON to the venv's python)"

if (( ! dry_run )); then
  missing=()
  for name in HF_CKPT DATA SGLANG_URLS; do [ -n "${!name:-}" ] || missing+=("$name"); done
  (( ${#missing[@]} == 0 )) || die "set ${missing[*]} (or use --dry-run to validate without them)"
  [ -n "${SGLANG_API_KEY:-}" ] || die "the SGLang servers require an API key: set SGLANG_API_KEY or SGLANG_API_KEY_FILE (launch_sglang_servers.sh wrote one to its LOG_DIR/sglang_api_key) or pass --sglang-api-key KEY"
  export SGLANG_API_KEY
  [ -f "$HF_CKPT/config.json" ] || die "HF_CKPT=$HF_CKPT has no config.json"
fi

# ------------------------------------------------------------------------------ trainer arguments
hf_config="${HF_CKPT:-}"
if [ -z "$hf_config" ] || [ ! -f "$hf_config/config.json" ]; then  # dry run only (checked above)
  echo "note: ${HF_CKPT:+HF_CKPT=$HF_CKPT has no config.json}${HF_CKPT:-HF_CKPT is not set}:" \
       "using the embedded Qwen3-30B-A3B config ${EMBEDDED_HF_CONFIG#$repo/}"
  hf_config="$EMBEDDED_HF_CONFIG"
fi
megatron_ckpt="$OUTPUT/megatron_ckpt"
train_args=(
  --config "$CONFIG"
  --hf-config "$hf_config"
  --load "$megatron_ckpt"
  --task math
  --data-path "${DATA:-/path/to/prompts.jsonl}"
  --tokenizer "${HF_CKPT:-/path/to/Qwen3-30B-A3B}"
  --rollout-engine sglang
  --sglang-urls "${SGLANG_URLS:-http://sglang-host:30000}"
  --routing-method "$METHOD"
  --save "$OUTPUT/checkpoints"
  --tensorboard-dir "$OUTPUT/tensorboard"
  --log-jsonl "$OUTPUT/metrics.jsonl"
)
if (( FP8 )); then
  train_args+=(--transformer-impl transformer_engine --fp8-format e4m3)
fi
optional=(OFF_POLICY_WINDOW:--off-policy-window PREDICTOR_LR_MULT:--predictor-lr-mult
          TP:--tensor-model-parallel-size PP:--pipeline-model-parallel-size
          EP:--expert-model-parallel-size ETP:--expert-tensor-parallel-size
          VPP:--virtual-pipeline-model-parallel-size)
for pair in "${optional[@]}"; do
  name="${pair%%:*}"
  if [ -n "${!name:-}" ]; then train_args+=("${pair#*:}" "${!name}"); fi
done
train_args+=(${extra[@]+"${extra[@]}"})

cd "$repo"
export PYTHONPATH="$repo${PYTHONPATH:+:$PYTHONPATH}"
validate=("$PYTHON" -m megatron_pr2.preflight.validate --nnodes "$NNODES" --gpus-per-node "$GPUS_PER_NODE")
read -r tp pp ep etp < <("${validate[@]}" --print-layout -- "${train_args[@]}" || echo "FAILED")
[ "$tp" != FAILED ] || exit 1

convert_cmd=("$PYTHON" tools/convert.py hf-to-megatron --hf-dir "${HF_CKPT:-/path/to/Qwen3-30B-A3B}"
             --out "$megatron_ckpt" --tp "$tp" --pp "$pp" --ep "$ep" --etp "$etp")
torchrun_cmd=("$PYTHON" -m torch.distributed.run --nnodes "$NNODES" --node-rank "$NODE_RANK"
              --nproc-per-node "$GPUS_PER_NODE" --master-addr "$MASTER_ADDR"
              --master-port "$MASTER_PORT" -m megatron_pr2.train "${train_args[@]}")

if (( dry_run )); then
  echo "== dry run: validating for NNODES=$NNODES x GPUS_PER_NODE=$GPUS_PER_NODE (no launch)"
  "${validate[@]}" -- "${train_args[@]}"
  echo "== would run (node 0, once): $(printf '%q ' "${convert_cmd[@]}")"
  echo "== would run (every node, NODE_RANK=$NODE_RANK): CUDA_DEVICE_MAX_CONNECTIONS=1 $(printf '%q ' "${torchrun_cmd[@]}")"
  echo "dry run OK"
  exit 0
fi

# ------------------------------------------------------------------------------ 1. validation
echo "== validating the configuration for NNODES=$NNODES x GPUS_PER_NODE=$GPUS_PER_NODE"
"${validate[@]}" -- "${train_args[@]}"

# ------------------------------------------------------------------------------ 2. conversion
marker="$megatron_ckpt.converted"
mkdir -p "$OUTPUT/logs"
if [ ! -f "$marker" ]; then
  if (( NODE_RANK == 0 )); then
    if [ -e "$megatron_ckpt" ] && [ -n "$(ls -A "$megatron_ckpt")" ]; then
      die "$megatron_ckpt exists without $marker (an interrupted conversion?): remove it and rerun"
    fi
    echo "== converting $HF_CKPT -> $megatron_ckpt (TP=$tp PP=$pp EP=$ep ETP=$etp)"
    "${convert_cmd[@]}" 2>&1 | tee "$OUTPUT/logs/convert.log"
    touch "$marker"
  else
    echo "== waiting for node 0 to convert the checkpoint ($marker)"
    waited=0
    until [ -f "$marker" ]; do
      (( waited < CONVERT_WAIT_SECONDS )) || die "no $marker after ${CONVERT_WAIT_SECONDS}s; is OUTPUT on a shared filesystem?"
      sleep 10; waited=$(( waited + 10 ))
    done
  fi
fi

# ------------------------------------------------------------------------------ 3. runtime check, train
echo "== checking this node's runtime (inputs, CUDA, GPUs, TransformerEngine)"
"${validate[@]}" --check-runtime -- "${train_args[@]}" > /dev/null
echo "== training: node $NODE_RANK of $NNODES, $GPUS_PER_NODE GPUs each; TensorBoard: $OUTPUT/tensorboard"
export CUDA_DEVICE_MAX_CONNECTIONS=1  # Megatron-Core: ordered kernel launches for TP/SP comm overlap
"${torchrun_cmd[@]}" 2>&1 | tee "$OUTPUT/logs/train_node$NODE_RANK.log"
