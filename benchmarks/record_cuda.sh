#!/usr/bin/env bash
# The committed GPU record (benchmarks/results/cuda/), as run on the GPU machine from the repository root:
# the packages a fresh install resolves today travel as wheels in .whl/ (the machine has older ones).
# Writes under ${RECORD:-/tmp/record}: a/ (models, attach, identity, serving), b/ (scaling), logs, status.txt.
set -u
R=${RECORD:-/tmp/record}
mkdir -p "$R"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    || { echo "wheels did not install" > "$R/status.txt"; touch "$R/done"; exit 1; }
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1
{
    python3 -c "import torch, peft, transformers; print(torch.__version__, peft.__version__, transformers.__version__, torch.cuda.get_device_name())"
    python3 -m pytest -q -p no:cacheprovider tests/core/test_fingerprint.py tests/binding/test_base_identity.py \
        tests/repro/test_check_reload.py > "$R/log-gpu-tests.txt" 2>&1
    echo "gpu tests rc $? at $(date -u +%T)"
    python3 -m benchmarks --device cuda --reps 11 --warmup 1 --models resnet50 mobilenet_v2 convnext_tiny vit_b16_384 spectral_norm llama_1b \
        --scaling 0 --serving 50 --out "$R/a" > "$R/log-models.txt" 2>&1
    echo "models rc $? at $(date -u +%T)"
    python3 -m benchmarks --device cuda --models none --scaling 10 100 1000 10000 --reps 11 --warmup 1 --serving 0 \
        --out "$R/b" > "$R/log-scaling.txt" 2>&1
    echo "scaling rc $? at $(date -u +%T)"
} > "$R/status.txt" 2>&1
touch "$R/done"
