#!/usr/bin/env bash
# The GPU session's one prepared script (run on the machine lent through the `device` tool, from the repo root,
# with .devdata carried: the four Fashion-MNIST IDX files and the MiniLM table of bench/gpu/make_minilm_table.py).
#   1. the retrain references that are missing (k=8 seeds 0-2, k=32 seed 2, k=128 seeds 0-2), seven at once;
#   2. bench/speed.py alone on the GPU (cold CLI and warm execute_run; no dashboard: no streamlit there);
#   3. the full bench grid, one process per method or variant at once (so its seconds are shared-GPU seconds).
# First, the tests marked cuda (CUDA_TESTS_S=0 skips them; the machine needs pytest).
# Every phase has a deadline, so whatever finished comes back under $OUT. A later session reruns part of it:
#   RETRAIN="" SPEED_S=0 KS=128 METHODS="adv l2ul" bash bench/gpu/run.sh   (no retrain, no speed, two bench rows)
#   RETRAIN="" SPEED_S=0 METHODS=none bash bench/gpu/run.sh                  (the CUDA tests alone)
#   TAG=h100 names the files for an H100.
set -u
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT" /tmp/logs
TAG=${TAG:-h200}  # the card, in the names of the files that come back (h100 or h200)
LOG=$OUT/log.txt
source bench/gpu/env.sh
t0=$(date +%s)
stamp() { echo "[$(( $(date +%s) - t0 )) s] $*" >> "$LOG"; }
{ nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv; nproc; python3 -c "import torch, numpy; \
print('torch', torch.__version__, 'numpy', numpy.__version__, torch.cuda.get_device_name())"; } >> "$LOG" 2>&1

CUDA_TESTS_S=${CUDA_TESTS_S:-120}
if [ "$CUDA_TESTS_S" -gt 0 ]; then
stamp "the CUDA tests (deadline ${CUDA_TESTS_S} s)"
timeout "$CUDA_TESTS_S" python3 -m pytest -q -m cuda -p no:cacheprovider tests/test_engine.py tests/test_sgd.py \
  > /tmp/logs/cuda-tests.out 2>&1; echo "pytest exit $?" >> "$LOG"; tail -n 15 /tmp/logs/cuda-tests.out >> "$LOG"
stamp "CUDA tests done"
fi

RETRAIN_S=${RETRAIN_S:-240}; SPEED_S=${SPEED_S:-150}; TOTAL_S=${TOTAL_S:-530}
RETRAIN=${RETRAIN-8:0 8:1 8:2 32:2 128:0 128:1 128:2}; KS=${KS:-8,32,128}
METHODS=${METHODS:-neggrad adv l2ul structguard structguard:paper structguard:no-sa structguard:no-sr structguard:no-cr}
if [ -n "$RETRAIN" ]; then
stamp "retrain: $RETRAIN at once (deadline ${RETRAIN_S} s)"
for spec in $RETRAIN; do
  k=${spec%:*}; s=${spec#*:}
  OMP_NUM_THREADS=2 timeout "$RETRAIN_S" python3 -m core retrain --k "$k" --forget-seed "$s" \
    > "/tmp/logs/retrain-k$k-s$s.out" 2> "/tmp/logs/retrain-k$k-s$s.err" &
done
wait
for f in /tmp/logs/retrain-*.out; do echo "$f: $(cat "$f")" >> "$LOG"; done
for f in /tmp/logs/retrain-*.err; do tail -c 400 "$f" | tr '\r' '\n' | tail -n 2 | sed "s|^|$f: |" >> "$LOG"; done
(cd bench/retrain/fmnist_resnet18_narrow && tar cf "$OUT/retrain-k8-k32.tar" k8-seed*.* k32-seed2.* 2>>"$LOG";
 tar cf "$OUT/retrain-k128.tar" k128-seed*.* 2>>"$LOG")
stamp "retrain done"
fi

if [ "$SPEED_S" -gt 0 ]; then
stamp "speed (deadline ${SPEED_S} s)"
timeout "$SPEED_S" python3 bench/speed.py --repeats 3 --no-dashboard --out "$OUT/speed-k32-$TAG.md" \
  > /tmp/logs/speed.out 2>&1 || { echo "speed failed:"; tail -n 30 /tmp/logs/speed.out; } >> "$LOG"
stamp "speed done"
fi

[ "$METHODS" = none ] && { stamp "all done"; exit 0; }
BENCH_S=$(( TOTAL_S - ($(date +%s) - t0) - 20 ))
stamp "bench: $METHODS at k=$KS, one process each, at once (deadline ${BENCH_S} s)"
for m in $METHODS; do
  n=${m/:/-}
  OMP_NUM_THREADS=2 timeout "$BENCH_S" python3 -m core bench --methods "$m" --ks "$KS" --seeds 0,1,2 \
    --backend local --jsonl "$OUT/bench-$TAG.jsonl" --runs-dir "/tmp/runs/$n" --out "/tmp/logs/bench-$n.md" \
    > "/tmp/logs/bench-$n.out" 2>&1 &
done
wait
for f in /tmp/logs/bench-*.out; do { echo "== $f"; grep -v "it/s\|s/it" "$f" | tail -n 12; } >> "$LOG"; done
stamp "all done"
