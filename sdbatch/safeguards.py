"""The safeguards between a request and a written image, behind one object that the job's
actors, `python -m sdbatch generate` and the server share:

1. the prompt filter (`--blocklist`): a prompt that matches a rule is refused before anything
   is generated;
2. Stable Diffusion's safety checker (`--safety-checker`): a flagged image is not kept;
3. provenance marks on every kept image: the invisible watermark (on unless `--no-watermark`),
   XMP with the IPTC digital source type, and a C2PA manifest (`--c2pa-cert`/`--c2pa-key`).

The safety checker runs before the watermark, as in SD's reference scripts.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass

import numpy as np

from sdbatch.blocklist import Blocklist, load_blocklist
from sdbatch.provenance import C2paSigner, ProvenanceError, mark_image


@dataclass(frozen=True)
class SafeguardSettings:
    """What the command line asked for (plain values: it travels to Ray actors).

    blocklist, safety_checker, c2pa_cert, c2pa_key: local paths or fsspec URIs, or None.
    Raises ValueError when only one of c2pa_cert and c2pa_key is given.
    """

    blocklist: str | None = None
    safety_checker: str | None = None
    watermark: bool = True
    c2pa_cert: str | None = None
    c2pa_key: str | None = None

    def __post_init__(self):
        if (self.c2pa_cert is None) != (self.c2pa_key is None):
            raise ValueError("--c2pa-cert and --c2pa-key go together: give both or neither")

    def check(self) -> Blocklist | None:
        """Reads and checks what the settings name, so that bad input fails before anything is
        generated: the blocklist, the C2PA certificate and key (a test signature), the safety
        checker's files (not its weights) and, with the watermark on, the invisible-watermark
        package. Returns the blocklist (None without one).

        Raises BlocklistError, CheckpointError or ProvenanceError (ValueErrors naming the file or
        the missing package), or ModuleNotFoundError when c2pa-python is missing.
        """
        from sdbatch.model.safety import find_safety_checker

        if self.watermark:
            try:
                import imwatermark  # noqa: F401
            except ModuleNotFoundError:
                raise ProvenanceError("the invisible watermark (on by default) needs the invisible-watermark "
                                      "package: pip install invisible-watermark (a dependency of sdbatch), or pass --no-watermark") from None
        if self.safety_checker:
            find_safety_checker(self.safety_checker)
        if self.c2pa_cert:
            C2paSigner.from_files(self.c2pa_cert, self.c2pa_key)
        return load_blocklist(self.blocklist) if self.blocklist else None

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> SafeguardSettings:
        """From the options `add_arguments` defines."""
        return cls(blocklist=args.blocklist, safety_checker=args.safety_checker, watermark=not args.no_watermark,
                   c2pa_cert=args.c2pa_cert, c2pa_key=args.c2pa_key)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The safeguard options of `jobs run`, `generate` and `serve`."""
    group = parser.add_argument_group("safeguards (see the README's 'Responsible use')")
    group.add_argument("--safety-checker", metavar="SRC",
                       help="SD's safety checker: a diffusers model folder (its safety_checker/ and feature_extractor/) "
                            "or a safety_checker/ folder, path or URI; flagged images are not kept (default: off)")
    group.add_argument("--blocklist", metavar="FILE",
                       help="prompt filter, path or URI: one rule per line, 're:REGEX' or a word/phrase, '#' comments")
    group.add_argument("--no-watermark", action="store_true",
                       help="do not add the invisible watermark (on by default: dwtDct, 'StableDiffusionV1')")
    group.add_argument("--c2pa-cert", metavar="PEM", help="sign each image with C2PA: certificate chain (leaf first)")
    group.add_argument("--c2pa-key", metavar="PEM", help="the C2PA signing certificate's private key")


@dataclass(frozen=True)
class Output:
    """One image after the safeguards: `png` is None when the safety checker flagged it."""

    png: bytes | None
    nsfw: bool
    watermark: bool
    c2pa: bool


class Safeguards:
    """Loaded safeguards. `check_prompt` before generating; `screen` then `mark` (or `process`,
    both at once) on the images.

    Loading reads the blocklist, the safety checker (onto `device`: float16 on CUDA, float32
    elsewhere) and the C2PA certificate and key, so bad input fails here, before any work.
    Raises BlocklistError, CheckpointError or ProvenanceError (all ValueErrors) naming the file.
    """

    def __init__(self, settings: SafeguardSettings, device: str = "cpu"):
        import torch

        from sdbatch.model.safety import load_safety_checker

        self.settings = settings
        self.blocklist: Blocklist | None = load_blocklist(settings.blocklist) if settings.blocklist else None
        self.checker = None
        if settings.safety_checker:
            dtype = torch.float16 if torch.device(device).type == "cuda" else torch.float32
            self.checker = load_safety_checker(settings.safety_checker, device=device, dtype=dtype)
        self.signer = C2paSigner.from_files(settings.c2pa_cert, settings.c2pa_key) if settings.c2pa_cert else None

    def check_prompt(self, prompt: str, negative: str | None = "") -> str | None:
        """Why this prompt is refused (naming the blocklist rule), or None when it may go ahead."""
        return None if self.blocklist is None else self.blocklist.check(prompt, negative)

    def screen(self, images) -> np.ndarray:
        """uint8 (H, W, 3) images -> (B,) bool: which the safety checker flags (all False when it is off)."""
        if self.checker is None:
            return np.zeros(len(images), dtype=bool)
        return self.checker.check(list(images)).nsfw

    def mark(self, image: np.ndarray, parameters: str, title: str = "image.png") -> Output:
        """A kept image -> its marked PNG (A1111 `parameters`, watermark, XMP, C2PA). Thread-safe:
        it can run off the generating thread."""
        marked = mark_image(image, {"parameters": parameters}, self.settings.watermark, self.signer, title)
        return Output(png=marked.png, nsfw=False, watermark=marked.watermark, c2pa=marked.c2pa)

    def process(self, images, parameters: list[str], titles: list[str] | None = None) -> list[Output]:
        """Screen then mark a batch: one Output per image, with png None for flagged ones."""
        titles = titles or [f"image-{i}.png" for i in range(len(images))]
        flags = self.screen(images)
        return [Output(None, True, False, False) if flag else self.mark(image, text, title)
                for image, text, title, flag in zip(images, parameters, titles, flags)]

