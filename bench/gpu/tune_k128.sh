#!/usr/bin/env bash
# Held-out screen of StructGuard's k=128 loop on the lent GPU (forget seeds 100-107, never the bench's; the test set
# is not read): eight settings, each over two halves of the seeds, sixteen bench/tune.py processes at once.
set -u
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT" /tmp/tune
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 PYTHONPATH=$PWD/bench/gpu OMP_NUM_THREADS=1
export STRUCTGUARD_FASHION_DIR=$PWD/.devdata/fashion-mnist STRUCTGUARD_MINILM_TABLE=$PWD/.devdata/minilm.json
DEADLINE=${DEADLINE:-270}
i=0
for grid in '{}' '{"mix_weight": [5.0]}' '{"mix_weight": [10.0]}' '{"mix_batch": [256]}' '{"margin": [0.5]}' \
            '{"sa_weight": [3.0]}' '{"lr": [0.0007]}' '{"train_from": ["layer1"]}'; do
  for seeds in 100,101,102,103 104,105,106,107; do
    i=$((i + 1))
    timeout "$DEADLINE" python3 bench/tune.py --method structguard --ks 128 --seeds "$seeds" --grid "$grid" \
      --jsonl "$OUT/tune-k128-h200.jsonl" --out "/tmp/tune/$i.md" > "/tmp/tune/$i.out" 2> "/tmp/tune/$i.err" &
  done
done
wait
for f in /tmp/tune/*.err; do grep -v "it/s\|Loading\|falls back" "$f"; done > "$OUT/tune-k128-h200-log.txt"
