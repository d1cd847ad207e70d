"""Which pip extra of sdbatch provides a module that failed to import, for `error:` lines that say
what to install (`pip install 'sdbatch[metrics]'`) instead of a ModuleNotFoundError traceback."""

import re
import sys
import tomllib
from importlib import metadata
from pathlib import Path

_REQUIREMENT = re.compile(r"\s*([A-Za-z0-9][A-Za-z0-9._-]*)")
_EXTRA_MARKER = re.compile(r"""extra\s*==\s*["']([^"']+)["']""")
# import names that differ from the distribution's name
_DISTRIBUTIONS = {"sklearn": "scikit-learn", "imwatermark": "invisible-watermark", "PIL": "pillow",
                  "yaml": "pyyaml", "c2pa": "c2pa-python", "cv2": "opencv-python"}


def _normalise(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _extras_table() -> dict[str, list[str]]:
    """{extra: [requirement strings]}: the installed package's metadata, else pyproject.toml
    beside the source tree (a checkout run with PYTHONPATH)."""
    try:
        table: dict[str, list[str]] = {}
        for line in metadata.requires("sdbatch") or []:
            marker = _EXTRA_MARKER.search(line)
            if marker:
                table.setdefault(marker.group(1), []).append(line.split(";")[0])
        if table:
            return table
    except metadata.PackageNotFoundError:
        pass
    try:
        project = tomllib.loads((Path(__file__).parent.parent / "pyproject.toml").read_text())
    except (OSError, tomllib.TOMLDecodeError):
        return {}
    return project.get("project", {}).get("optional-dependencies", {})


def extra_for(module: str | None) -> str | None:
    """The smallest extra whose requirements include the distribution named like `module`'s top
    package (`torch_fidelity` -> torch-fidelity -> "metrics"); None if no extra lists it."""
    if not module:
        return None
    top = module.split(".")[0]
    wanted = _normalise(_DISTRIBUTIONS.get(top, top))
    matches = []
    for extra, requirements in _extras_table().items():
        names = {_normalise(m.group(1)) for r in requirements if (m := _REQUIREMENT.match(r))}
        if wanted in names and extra not in ("all", "test"):
            matches.append((len(requirements), extra))
    return min(matches)[1] if matches else None


def missing_extra_message(exc: ModuleNotFoundError, command: str) -> str | None:
    """`error:` text for a command that failed to import an optional dependency, or None when the
    module belongs to no extra (a real bug, to be raised as it is)."""
    extra = extra_for(exc.name)
    if extra is None:
        return None
    return (f"{command} needs the '{extra}' extra (module {exc.name!r} is not installed): "
            f"pip install 'sdbatch[{extra}]' (from a checkout: pip install -e '.[{extra}]')")


def report_missing_extra(exc: ModuleNotFoundError, command: str) -> int:
    """Prints the `error:` line naming the extra to install and returns exit status 2; re-raises
    `exc` when the module belongs to no extra."""
    message = missing_extra_message(exc, command)
    if message is None:
        raise exc
    print(f"error: {message}", file=sys.stderr)
    return 2
