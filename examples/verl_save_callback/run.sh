#!/usr/bin/env bash
# verl FSDP saves (2 CPU ranks, real FSDPCheckpointManager) exported to Hugging Face format by
# ckpt-bridge's verl checkpoint callback, then the same with `ckpt-bridge watch` (verl without the hook).
#   bash examples/verl_save_callback/run.sh [WORKDIR]      (run `make install` first)
set -euo pipefail
cd "$(dirname "$0")/../.."
BIN=.venv/bin
WORK=${1:-$(mktemp -d)}
export OMP_NUM_THREADS=1

# 1. two saves (steps 1 and 2) of a tiny OLMo-2 trained with FSDP2 on 2 ranks
rm -rf "$WORK/ckpt"
$BIN/torchrun --nproc_per_node=2 --master_addr=127.0.0.1 --master_port=29551 \
    -m ckpt_bridge.testing.verl_save --model olmo2 --out "$WORK/ckpt" --mesh 2 --steps 2 --save-steps 1,2

# 2. the callback, as verl's trainer calls it: exports land in global_step_N/actor_hf
$BIN/python examples/verl_save_callback/driver.py "$WORK/ckpt"
$BIN/ckpt-bridge verify "$WORK/ckpt/global_step_2/actor" "$WORK/ckpt/global_step_2/actor_hf" | tail -2

# 3. for verl versions without the hook: follow latest_checkpointed_iteration.txt from outside the job
$BIN/ckpt-bridge watch "$WORK/ckpt" --once --all --out-root "$WORK/watched"
$BIN/ckpt-bridge watch "$WORK/ckpt" --once --all --out-root "$WORK/watched"   # idempotent: both skipped
echo "outputs in $WORK"
