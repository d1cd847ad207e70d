"""Marks that say an image is AI-generated, in the formats other tools read back.

- The invisible watermark of Stable Diffusion's reference scripts: the `invisible-watermark`
  library, method dwtDct, payload b"StableDiffusionV1" (136 bits). The library refuses images
  with fewer pixels than 256x256; those are left unmarked (and reported as such).
- XMP carrying the IPTC digital source type `trainedAlgorithmicMedia`, in the iTXt chunk
  `XML:com.adobe.xmp` that the XMP specification (part 3) defines for PNG.
- Optionally a signed C2PA manifest (`c2pa-python`): a `c2pa.actions` assertion whose
  `c2pa.created` action carries that digital source type, and the generator's name and version.

`mark_image` applies all three to an image as it is encoded to PNG with its text chunks (the
A1111 `parameters`); `mark_png` does the same to a PNG, keeping its text chunks.
"""

from __future__ import annotations

import io
import json
import xml.sax.saxutils
from dataclasses import dataclass
from functools import cache

import numpy as np

from sdbatch import __version__, storage

WATERMARK_PAYLOAD = b"StableDiffusionV1"  # SD v1 reference scripts (scripts/txt2img.py)
WATERMARK_METHOD = "dwtDct"
MIN_WATERMARK_PIXELS = 256 * 256  # invisible-watermark refuses fewer pixels (rows * cols)
TRAINED_ALGORITHMIC_MEDIA = "http://cv.iptc.org/newscodes/digitalsourcetype/trainedAlgorithmicMedia"
XMP_KEY = "XML:com.adobe.xmp"
GENERATOR = "sdbatch"


class ProvenanceError(ValueError):
    """Bad signing material or an image that cannot be marked; the message names the input."""


@dataclass(frozen=True)
class Marked:
    """A marked PNG and which marks it carries (the XMP label is always there)."""

    png: bytes
    watermark: bool
    c2pa: bool


# ---------------------------------------------------------------------------------------------
# invisible watermark


def can_watermark(height: int, width: int) -> bool:
    """Whether invisible-watermark can mark an image of this size (at least 256*256 pixels)."""
    return height * width >= MIN_WATERMARK_PIXELS


@cache
def _encoder():
    from imwatermark import WatermarkEncoder

    encoder = WatermarkEncoder()
    encoder.set_watermark("bytes", WATERMARK_PAYLOAD)
    return encoder


def add_watermark(image: np.ndarray) -> np.ndarray | None:
    """uint8 RGB (H, W, 3) -> a watermarked copy, or None when the image is too small.

    As SD's reference scripts do: RGB -> BGR, `WatermarkEncoder.encode(bgr, "dwtDct")`, back to RGB.
    """
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"expected a uint8 (H, W, 3) image, got {image.dtype} {image.shape}")
    if not can_watermark(*image.shape[:2]):
        return None
    return np.ascontiguousarray(_encoder().encode(np.ascontiguousarray(image[:, :, ::-1]), WATERMARK_METHOD)[:, :, ::-1])


def read_watermark(image: np.ndarray) -> bytes | None:
    """The 17-byte payload invisible-watermark's decoder reads from a uint8 RGB (H, W, 3)
    image (equal to WATERMARK_PAYLOAD when marked and intact), or None when too small."""
    from imwatermark import WatermarkDecoder

    if not can_watermark(*image.shape[:2]):
        return None
    decoder = WatermarkDecoder("bytes", 8 * len(WATERMARK_PAYLOAD))
    return decoder.decode(np.ascontiguousarray(image[:, :, ::-1]), WATERMARK_METHOD)


def payload_agreement(payload: bytes | None) -> float:
    """Share of the bits of a decoded payload (`read_watermark`) that equal WATERMARK_PAYLOAD's:
    1.0 for an intact mark, about 0.97 typical at 256x256, about 0.5 for an unmarked image
    (the decoder reads noise), 0.0 for None."""
    if payload is None:
        return 0.0
    want = np.unpackbits(np.frombuffer(WATERMARK_PAYLOAD, np.uint8))
    return float((np.unpackbits(np.frombuffer(payload, np.uint8)) == want).mean())


def has_watermark(image: np.ndarray, min_agreement: float = 0.9) -> bool:
    """Whether a uint8 RGB (H, W, 3) image carries the SD watermark: at least `min_agreement` of
    the payload's 136 bits read back (the decoder returns bytes for any image, marked or not)."""
    return payload_agreement(read_watermark(image)) >= min_agreement


# ---------------------------------------------------------------------------------------------
# XMP


def xmp_packet(generator: str = f"{GENERATOR} {__version__}") -> str:
    """An XMP packet labelling the image as made by a trained model (IPTC Iptc4xmpExt:DigitalSourceType)."""
    tool = xml.sax.saxutils.quoteattr(generator)
    return (
        '<?xpacket begin="\ufeff" id="W5M0MpCehiHzreSzNTczkc9d"?>\n'
        '<x:xmpmeta xmlns:x="adobe:ns:meta/">\n'
        ' <rdf:RDF xmlns:rdf="http://www.w3.org/1999/02/22-rdf-syntax-ns#">\n'
        '  <rdf:Description rdf:about=""\n'
        '    xmlns:Iptc4xmpExt="http://iptc.org/std/Iptc4xmpExt/2008-02-29/"\n'
        '    xmlns:xmp="http://ns.adobe.com/xap/1.0/"\n'
        f'    Iptc4xmpExt:DigitalSourceType="{TRAINED_ALGORITHMIC_MEDIA}"\n'
        f'    xmp:CreatorTool={tool}/>\n'
        ' </rdf:RDF>\n'
        '</x:xmpmeta>\n'
        '<?xpacket end="w"?>'
    )


# ---------------------------------------------------------------------------------------------
# C2PA


def _algorithm(key, source: str):
    from c2pa import C2paSigningAlg
    from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa

    if isinstance(key, ec.EllipticCurvePrivateKey):
        algs = {"secp256r1": C2paSigningAlg.ES256, "secp384r1": C2paSigningAlg.ES384, "secp521r1": C2paSigningAlg.ES512}
        if key.curve.name in algs:
            return algs[key.curve.name]
        raise ProvenanceError(f"{source}: C2PA signs with EC keys on P-256, P-384 or P-521, not {key.curve.name}")
    if isinstance(key, rsa.RSAPrivateKey):
        return C2paSigningAlg.PS256
    if isinstance(key, ed25519.Ed25519PrivateKey):
        return C2paSigningAlg.ED25519
    raise ProvenanceError(f"{source}: unsupported key type {type(key).__name__} (C2PA takes EC, RSA or Ed25519)")


class C2paSigner:
    """Signs PNGs with a C2PA manifest (c2pa-python), with one certificate chain and key.

    cert: PEM certificates, the signing (leaf) certificate first, then its issuers; c2pa
    accepts only a CA-issued leaf (not self-signed) with the digitalSignature key usage and
    an emailProtection or timeStamping extended key usage. key: the leaf's PEM private key;
    the algorithm follows from it (EC P-256: ES256, P-384: ES384, P-521: ES512, RSA: PS256,
    Ed25519). Thumbnails are left out of the manifest (the image is the asset).
    """

    def __init__(self, cert_pem: bytes, key_pem: bytes, source: str = "<c2pa>"):
        import c2pa
        from cryptography.hazmat.primitives.serialization import load_pem_private_key

        try:
            key = load_pem_private_key(key_pem, password=None)
        except (ValueError, TypeError) as e:
            raise ProvenanceError(f"{source}: cannot read the private key (PEM, unencrypted): {e}") from None
        self.source = source
        self._info = c2pa.C2paSignerInfo(_algorithm(key, source), cert_pem, key_pem, None)
        self._context = c2pa.Context.from_dict({"builder": {"thumbnail": {"enabled": False}}})
        try:
            self._signer = c2pa.Signer.from_info(self._info)
            self.sign(_probe_png())  # c2pa checks the certificate only when it signs: fail here, not per image
        except c2pa.C2paError as e:
            raise ProvenanceError(f"{source}: c2pa refused this certificate and key: {e}") from None

    @classmethod
    def from_files(cls, cert: str, key: str) -> C2paSigner:
        """Read the PEM certificate chain and key from local paths or fsspec URIs."""
        material = []
        for what, uri in (("certificate", cert), ("key", key)):
            try:
                fs, path = storage.url_to_fs(uri)
                material.append(storage.read_bytes(fs, path))
            except (OSError, ValueError) as e:
                raise ProvenanceError(f"{uri}: cannot read the C2PA {what}: {e}") from None
        return cls(material[0], material[1], source=f"{cert} + {key}")

    def manifest(self, title: str) -> dict:
        """The manifest definition: generator name/version and a c2pa.created action with the
        IPTC digital source type trainedAlgorithmicMedia."""
        agent = {"name": GENERATOR, "version": __version__}
        return {
            "claim_generator_info": [agent],
            "title": title,
            "format": "image/png",
            "assertions": [{"label": "c2pa.actions", "data": {"actions": [
                {"action": "c2pa.created", "digitalSourceType": TRAINED_ALGORITHMIC_MEDIA, "softwareAgent": agent},
            ]}}],
        }

    def sign(self, png: bytes, title: str = "image.png") -> bytes:
        """PNG bytes -> the same PNG with a signed C2PA manifest embedded (a caBX chunk)."""
        import c2pa

        out = io.BytesIO()
        with c2pa.Builder(json.dumps(self.manifest(title)), self._context) as builder:
            builder.sign(self._signer, "image/png", io.BytesIO(png), out)
        return out.getvalue()


@cache
def _probe_png() -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (8, 8)).save(buf, format="PNG")
    return buf.getvalue()


# ---------------------------------------------------------------------------------------------
# all marks on a PNG


def mark_image(image: np.ndarray, texts: dict[str, str], watermark: bool = True,
               signer: C2paSigner | None = None, title: str = "image.png") -> Marked:
    """uint8 RGB (H, W, 3) -> Marked: a PNG carrying `texts` as text chunks (the A1111
    `parameters`), the invisible watermark (when `watermark` and the image has at least
    256*256 pixels), XMP with the IPTC digital source type, and a C2PA manifest when a signer
    is given (`title` names the image in it)."""
    from PIL import Image, PngImagePlugin

    marked = add_watermark(image) if watermark else None
    info = PngImagePlugin.PngInfo()
    for key, value in texts.items():
        if key != XMP_KEY:
            info.add_text(key, value)
    info.add_itxt(XMP_KEY, xmp_packet())
    buf = io.BytesIO()
    Image.fromarray(image if marked is None else marked).save(buf, format="PNG", pnginfo=info)
    data = buf.getvalue()
    if signer is not None:
        data = signer.sign(data, title)
    return Marked(png=data, watermark=marked is not None, c2pa=signer is not None)


def mark_png(png: bytes, watermark: bool = True, signer: C2paSigner | None = None,
             title: str = "image.png") -> Marked:
    """PNG bytes -> Marked (see `mark_image`), keeping the PNG's text chunks (the A1111
    `parameters`); any XMP it carried is replaced, and the pixels come back as RGB.
    Raises ProvenanceError for bytes Pillow cannot read as an image."""
    from PIL import Image

    try:
        with Image.open(io.BytesIO(png)) as im:
            im.load()
            texts = dict(getattr(im, "text", {}))
            pixels = np.asarray(im.convert("RGB"))
    except OSError as e:
        raise ProvenanceError(f"{title}: not a readable PNG: {e}") from None
    return mark_image(pixels, texts, watermark, signer, title)
