#!/usr/bin/env bash
# TorchTitan (FSDP2, 2 CPU ranks) with ckpt-bridge's save hook: every checkpoint save also writes
# RUN/checkpoint/hf/step-N (merged HF weights, aux head apart, lr_scheduler + every rank's rng).
#   bash examples/torchtitan_hf_export/run.sh [WORKDIR]      (run `make install` first)
set -euo pipefail
cd "$(dirname "$0")/../.."
BIN=.venv/bin
WORK=${1:-$(mktemp -d)}
export OMP_NUM_THREADS=1

# 1. a tiny OLMo-2 in Hugging Face format (stands in for the model you continue from)
[ -f "$WORK/olmo2-hf/config.json" ] || $BIN/python -c "
from ckpt_bridge.testing.tiny_models import save_tiny_hf; save_tiny_hf('$WORK/olmo2-hf', 'olmo2')" 2>/dev/null

# 2. train 10 steps, save at 5 and 10; each save is exported in the background
rm -rf "$WORK/run"
$BIN/torchrun --nproc_per_node=2 --master_addr=127.0.0.1 --master_port=29541 \
    examples/torchtitan_hf_export/train.py --hf "$WORK/olmo2-hf" --dump "$WORK/run" --steps 10 --interval 5

# 3. the export of step 10 holds exactly the checkpoint's model weights
ls "$WORK/run/checkpoint" "$WORK/run/checkpoint/hf/step-10"
$BIN/ckpt-bridge verify "$WORK/run/checkpoint/hf/step-10" "$WORK/run/checkpoint/step-10" | tail -3
cat "$WORK/run/checkpoint/hf/step-10/trainer_state.json"
echo "outputs in $WORK"
