#!/usr/bin/env bash
# The README's main job, end to end on this machine: installs sdbatch with its Ray extra into
# .venv, then generates the images of jobs/example_prompts.parquet on a local Ray into out/example/.
#
# No Stable Diffusion weights ship with sdbatch and none can be downloaded here, so the model is
# a SMOKE-TEST MODEL: a tiny checkpoint with random weights (SD v1.x structure, a few MB). It runs
# the whole job, but its images are noise. For real images pass real weights instead:
#   python -m sdbatch.jobs run jobs/example_prompts.parquet \
#       --model path/to/v1-5-pruned-emaonly.safetensors --output out/example     (or s3://...)
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m venv .venv
.venv/bin/python -m pip install -q --disable-pip-version-check -e '.[ray]'

mkdir -p out
MODEL=out/smoke-test-random-weights.safetensors
if [ ! -f "$MODEL" ]; then
    echo "creating $MODEL (random weights: a smoke test, not a real model)"
    .venv/bin/python -c "from sdbatch.model.weights import save_random_checkpoint; save_random_checkpoint('$MODEL')"
fi

# Re-running this script completes only what is missing; out/example/ is kept.
.venv/bin/python -m sdbatch.jobs run jobs/example_prompts.parquet --model "$MODEL" \
    --output out/example --steps 10 --width 128 --height 128 --batch-size 4
.venv/bin/python -m sdbatch.jobs status out/example
echo
echo "images:      $PWD/out/example/images/  (PNG, generation parameters in their 'parameters' text chunk)"
echo "manifest:    $PWD/out/example/manifest/  (Parquet, one row per image)"
echo "errors:      $PWD/out/example/errors/  (Parquet, rows that could not be generated)"
echo "run details: $PWD/out/example/run.json"
