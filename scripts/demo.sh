#!/usr/bin/env bash
# The README's main job, end to end on this machine: installs sdbatch with its Ray extra into
# .venv, then generates the 28 images of jobs/shapes/prompts.parquet on a local Ray into
# out/shapes/, and a contact sheet of them (out/shapes/contact-sheet.png).
#
# No Stable Diffusion weights ship with sdbatch and none can be downloaded here, so the job runs
# without --model: it uses sdbatch's BUILT-IN DEMO MODEL (builtin:shapes, sdbatch/builtin/shapes.md),
# a small model with SD v1.x's structure that sdbatch trained itself on synthetic pictures of one
# coloured shape on a plain background (64x64). It is not Stable Diffusion. For real images pass
# real weights instead:
#   python -m sdbatch.jobs run jobs/example_prompts.parquet \
#       --model path/to/v1-5-pruned-emaonly.safetensors --output out/example     (or s3://...)
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m venv .venv
.venv/bin/python -m pip install -q --disable-pip-version-check -e '.[ray]'

# Re-running this script completes only what is missing; out/shapes/ is kept.
.venv/bin/python -m sdbatch.jobs run jobs/shapes/prompts.parquet --output out/shapes --steps 20 --batch-size 8
.venv/bin/python -m sdbatch.jobs status out/shapes
.venv/bin/python scripts/contact_sheet.py out/shapes
echo
echo "contact sheet: $PWD/out/shapes/contact-sheet.png  (every image with its prompt)"
echo "images:        $PWD/out/shapes/images/  (PNG, generation parameters in their 'parameters' text chunk)"
echo "manifest:      $PWD/out/shapes/manifest/  (Parquet, one row per image)"
echo "errors:        $PWD/out/shapes/errors/  (Parquet, rows that could not be generated)"
echo "run details:   $PWD/out/shapes/run.json"
