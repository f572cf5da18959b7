#!/usr/bin/env bash
# Save a tiny OLMo-2 with verl's FSDPCheckpointManager on 2 CPU ranks, then
# inspect it, export it to Hugging Face format (fp32 and bf16) and verify both.
#   bash examples/verl_fsdp_to_hf/run.sh [WORKDIR]      (run `make install` first)
set -euo pipefail
cd "$(dirname "$0")/../.."
BIN=.venv/bin
WORK=${1:-$(mktemp -d)}
export OMP_NUM_THREADS=1

# 1. a real verl checkpoint: WORK/ckpt/global_step_2/actor (2 ranks, FSDP2, gloo)
$BIN/torchrun --nproc_per_node=2 --master_addr=127.0.0.1 --master_port=29517 \
    -m ckpt_bridge.testing.verl_save --model olmo2 --out "$WORK/ckpt" --mesh 2 --steps 2

# 2. what is it?
$BIN/ckpt-bridge inspect "$WORK/ckpt/global_step_2"

# 3. export: trained dtype, then bf16 in small shards
$BIN/ckpt-bridge to-hf "$WORK/ckpt/global_step_2" --out "$WORK/hf" --overwrite
$BIN/ckpt-bridge to-hf "$WORK/ckpt/global_step_2" --out "$WORK/hf-bf16" --dtype bf16 --max-shard-size 100KB --overwrite

# 4. check: bit-exact, exact after the same cast, and the same logits
$BIN/ckpt-bridge verify "$WORK/ckpt/global_step_2" "$WORK/hf"
$BIN/ckpt-bridge verify "$WORK/ckpt/global_step_2" "$WORK/hf-bf16" --cast-to bf16
$BIN/ckpt-bridge verify "$WORK/hf" "$WORK/hf-bf16" --cast-to bf16 --logits
echo "outputs in $WORK"
