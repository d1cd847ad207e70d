"""Models that ship inside the sdbatch package, named `builtin:NAME` wherever a model is taken.

    sdbatch.load_model("builtin:shapes")
    python -m sdbatch generate "a red circle on a blue background" -o out.png   # builtin:shapes
    python -m sdbatch.jobs run PROMPTS --model builtin:shapes --output OUT

Each is an ordinary SD v1.x single-file checkpoint in the LDM layout, beside this module, with its
model card (NAME.md). This module only maps a name to its file; the file loads through
`sdbatch.load_model`'s normal path. It imports nothing heavy (no torch, no Ray).
"""

from __future__ import annotations

import sys
from pathlib import Path

PREFIX = "builtin:"
FOLDER = Path(__file__).parent
# name -> what it is, as a command says when it picks the model itself
MODELS = {
    "shapes": "sdbatch's built-in demo model (64x64 pictures of one coloured shape on a plain "
              "background, trained by sdbatch itself), not Stable Diffusion",
}
DEFAULT = f"{PREFIX}shapes"  # what `generate` and `jobs run` use without --model


class BuiltinModelError(ValueError):
    """An unknown built-in model name, or a built-in model whose file this install lacks."""


def names() -> tuple[str, ...]:
    """The built-in models' names, as `builtin:NAME` takes them."""
    return tuple(MODELS)


def is_builtin(source: object) -> bool:
    """Whether a model source (path, URI or `builtin:NAME`) names a built-in model."""
    return isinstance(source, str) and source.startswith(PREFIX)


def builtin_path(name: str) -> Path:
    """The checkpoint file of built-in model `name` (`shapes`, or `builtin:shapes`).

    Raises BuiltinModelError naming the unknown name and listing the known ones, or saying that
    the file is missing from this install (a source checkout without the model, or a package
    built without its package data).
    """
    name = name.removeprefix(PREFIX)
    if name not in MODELS:
        raise BuiltinModelError(f"{PREFIX}{name}: no such built-in model; sdbatch has "
                                f"{', '.join(PREFIX + n for n in MODELS)}")
    path = FOLDER / f"{name}.safetensors"
    if not path.is_file():
        raise BuiltinModelError(f"{PREFIX}{name}: its file {path} is missing from this install of sdbatch "
                                f"(reinstall sdbatch, or give --model a checkpoint of your own)")
    return path


def default_model(given: str | None) -> str:
    """The model a command uses: `given`, or without one DEFAULT, saying on stderr what it is
    (so nobody takes its pictures for Stable Diffusion's)."""
    if given is not None:
        return given
    print(f"no --model given: using {DEFAULT}, {MODELS[DEFAULT.removeprefix(PREFIX)]}", file=sys.stderr)
    return DEFAULT
