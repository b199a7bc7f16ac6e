# Sourced by the bench/gpu scripts on the lent GPU machine (from the repo root, with .devdata carried).
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 PYTHONPATH=$PWD/bench/gpu
export STRUCTGUARD_FASHION_DIR=$PWD/.devdata/fashion-mnist STRUCTGUARD_MINILM_TABLE=$PWD/.devdata/minilm.json
