#!/usr/bin/env bash
# Continued pretraining of a tiny OLMo-2 from its Hugging Face weights with TorchTitan's CheckpointManager,
# FSDP2 on 2 CPU ranks, plus future_predictor and action_layer heads.
#   bash examples/olmo2_continued_pretraining/run.sh [WORKDIR]      (run `make install` first)
set -euo pipefail
cd "$(dirname "$0")/../.."
BIN=.venv/bin
WORK=${1:-$(mktemp -d)}
export OMP_NUM_THREADS=1

# 1. the "released" model: a tiny OLMo-2 trained on the shipped corpus (stands in for allenai/OLMo-2-*)
[ -f "$WORK/olmo2-hf/config.json" ] || $BIN/python -m ckpt_bridge.testing.tiny_olmo2 --out "$WORK/olmo2-hf"

# 2. what the bootstrap checkpoint will hold (no files written)
$BIN/ckpt-bridge to-dcp "$WORK/olmo2-hf" --out "$WORK/dry" --aux future_predictor --aux action_layer:linear:16 \
    --dry-run | head -4

# 3. train: set_initial_load -> meta build -> fully_shard -> to_empty -> load -> after_load -> 20 steps, saves
rm -rf "$WORK/run"
$BIN/torchrun --nproc_per_node=2 --master_addr=127.0.0.1 --master_port=29531 \
    examples/olmo2_continued_pretraining/train.py --hf "$WORK/olmo2-hf" --dump "$WORK/run" --steps 20

# 4. the bootstrap checkpoint against its source: keys the installed torchtitan requests, values, loss
BOOT=$(ls -d "$WORK"/run/bootstrap-cache/*/ | head -1)
$BIN/python -c "from ckpt_bridge.testing.tiny_olmo2 import corpus_text; print(corpus_text())" > "$WORK/corpus.txt"
$BIN/ckpt-bridge verify "$BOOT" --against "$WORK/olmo2-hf" --loss "$WORK/corpus.txt" --loss-tokens 1024
echo "outputs in $WORK"
