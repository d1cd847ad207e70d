"""Safeguards: the safety checker against diffusers' on the same random weights, the prompt
blocklist, and the provenance marks read back with their own readers (invisible-watermark's
decoder, Pillow's XMP, c2pa's Reader with a certificate chain made here)."""

import datetime
import io
import json
import shutil
import sys
import xml.etree.ElementTree as ET

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

from sdbatch.a1111 import encode_png
from sdbatch.blocklist import Blocklist, BlocklistError, load_blocklist
from sdbatch.model.safety import load_safety_checker
from sdbatch.model.weights import CheckpointError
from sdbatch.provenance import (
    TRAINED_ALGORITHMIC_MEDIA, WATERMARK_PAYLOAD, XMP_KEY, C2paSigner, ProvenanceError, has_watermark, mark_png,
    read_watermark,
)
from sdbatch.safeguards import SafeguardSettings, Safeguards

diffusers_safety = pytest.importorskip("diffusers.pipelines.stable_diffusion.safety_checker")
transformers = pytest.importorskip("transformers")

IPTC_EXT = "{http://iptc.org/std/Iptc4xmpExt/2008-02-29/}DigitalSourceType"
VISION = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
              image_size=224, patch_size=28)
SIZES = [(300, 260), (224, 224), (256, 400), (512, 512), (231, 333), (260, 300)]
T = 3  # the image the reference fixture flags through the special-care adjustment


def natural_image(h: int, w: int, seed: int = 0, alpha: float = 0.7) -> np.ndarray:
    """uint8 (h, w, 3) with a 1/f^alpha spectrum per channel, like natural images (smooth
    areas and edges at every scale; invisible-watermark reads its mark back reliably from these
    at 512x512, not from flat colour or pure noise)."""
    rng = np.random.default_rng(seed)
    f = np.hypot(np.fft.fftfreq(h)[:, None], np.fft.fftfreq(w)[None, :])
    f[0, 0] = 1
    channels = []
    for _ in range(3):
        spectrum = (rng.normal(size=(h, w)) + 1j * rng.normal(size=(h, w))) / f**alpha
        spectrum[0, 0] = 0
        x = np.fft.ifft2(spectrum).real
        channels.append(x / x.std())
    return np.clip(128 + 40 * np.stack(channels, -1), 0, 255).astype(np.uint8)


# ----------------------------------------------------------------------------- safety checker


def diffusers_result(ref, pixels: torch.Tensor) -> tuple[list[bool], np.ndarray, np.ndarray]:
    """diffusers' flags and its per-concept scores, read from `forward`'s own `result` as it returns."""
    seen = {}

    def watch(frame, event, arg):
        if event == "return" and frame.f_code is type(ref).forward.__wrapped__.__code__:
            seen["result"] = frame.f_locals["result"]

    sys.setprofile(watch)
    try:
        _, flags = ref(clip_input=pixels, images=[np.zeros(3) for _ in range(len(pixels))])
    finally:
        sys.setprofile(None)
    result = seen["result"]
    scores = np.array([[r["concept_scores"][j] for j in range(len(r["concept_scores"]))] for r in result])
    special = np.array([[r["special_scores"][j] for j in range(len(r["special_scores"]))] for r in result])
    return flags, scores, special


def random_reference(seed: int = 0):
    """diffusers' StableDiffusionSafetyChecker, small, with random weights (matrices large
    enough that different images embed far apart)."""
    torch.manual_seed(seed)
    config = transformers.CLIPConfig(vision_config=VISION, projection_dim=32)
    ref = diffusers_safety.StableDiffusionSafetyChecker(config).eval()
    with torch.no_grad():
        for name, p in ref.named_parameters():
            if name.endswith("embeds"):
                p.copy_(torch.randn_like(p))
            elif p.ndim == 1:
                p.copy_(0.1 * torch.randn_like(p) + (1.0 if "norm" in name and name.endswith("weight") else 0.0))
            else:
                p.copy_(2 * torch.randn_like(p) / p[0].numel() ** 0.5)
    return ref


def save_checker(ref, folder):
    """A diffusers model folder holding `ref` as its safety_checker/ and a feature_extractor/."""
    ref.save_pretrained(folder / "safety_checker")
    transformers.CLIPImageProcessorPil().save_pretrained(folder / "feature_extractor")
    return folder


@pytest.fixture(scope="module")
def images():
    return [natural_image(h, w, seed=i) for i, (h, w) in enumerate(SIZES)]


@pytest.fixture(scope="module")
def reference(images):
    """diffusers' checker on random weights, thresholds placed between these images' similarities
    so that some images are flagged and some not, by a concept or only through the special-care
    adjustment."""
    ref = random_reference()
    with torch.no_grad():
        pixels = transformers.CLIPImageProcessorPil()(images=images, return_tensors="pt").pixel_values
        embeds = torch.nn.functional.normalize(ref.visual_projection(ref.vision_model(pixels)[1]))
        cos = embeds @ torch.nn.functional.normalize(ref.concept_embeds).T
        special = embeds @ torch.nn.functional.normalize(ref.special_care_embeds).T
        # image T is flagged only through the special-care adjustment: it misses concept C by 0.005,
        # and scores 0.02 on special-care concept S (C and S: where it leads the other images most)
        others = [i for i in range(len(images)) if i != T]
        lead = cos[T] - cos[others].max(0).values
        lead[0] = -1
        concept = int(lead.argmax())
        special_lead = special[T] - special[others].max(0).values
        care = int(special_lead.argmax())
        assert lead[concept] > 0.01, "random weights without a concept that image T leads on"
        ref.concept_embeds_weights.copy_(cos.max(0).values + 0.05)  # nothing flagged ...
        ref.concept_embeds_weights[0] = cos[:, 0].sort().values[-2:].mean()  # ... but the top image on concept 0
        ref.concept_embeds_weights[concept] = cos[T, concept] + 0.005
        ref.special_care_embeds_weights.copy_(special.max(0).values + 0.05)
        ref.special_care_embeds_weights[care] = special[T, care] - 0.02
    ref.flagged_by_adjustment = (T, concept, care)
    return ref


@pytest.fixture(scope="module")
def checker_dirs(reference, tmp_path_factory):
    """The same weights as a diffusers model folder (transformers 5 keys, safetensors, dict
    preprocessor config) and as a bare safety checker folder in the published layout
    (vision_model.vision_model.*, pytorch_model.bin, the old int preprocessor config beside it)."""
    root = tmp_path_factory.mktemp("safety")
    model = save_checker(reference, root / "model")
    old = root / "old" / "safety_checker"
    old.mkdir(parents=True)
    shutil.copy(model / "safety_checker" / "config.json", old / "config.json")
    sd = load_file(model / "safety_checker" / "model.safetensors")
    torch.save({k.replace("vision_model.", "vision_model.vision_model.", 1): v for k, v in sd.items()},
               old / "pytorch_model.bin")
    (old / "preprocessor_config.json").write_text(json.dumps({
        "crop_size": 224, "do_center_crop": True, "do_convert_rgb": True, "do_normalize": True, "do_resize": True,
        "feature_extractor_type": "CLIPFeatureExtractor", "image_mean": [0.48145466, 0.4578275, 0.40821073],
        "image_std": [0.26862954, 0.26130258, 0.27577711], "resample": 3, "size": 224}))
    return model, old


def test_published_layout_keys(checker_dirs):
    _, old = checker_dirs
    keys = torch.load(old / "pytorch_model.bin", weights_only=True)
    assert "vision_model.vision_model.encoder.layers.0.self_attn.q_proj.weight" in keys


def test_preprocessing_matches_clip_image_processor(checker_dirs, images):
    for folder, processor_dir in ((checker_dirs[0], checker_dirs[0] / "feature_extractor"),
                                  (checker_dirs[1], checker_dirs[1])):
        ours = load_safety_checker(str(folder)).preprocess(images)
        ref = transformers.CLIPImageProcessorPil.from_pretrained(processor_dir)(images=images, return_tensors="pt")
        assert ours.shape == (len(images), 3, 224, 224)
        torch.testing.assert_close(ours, ref.pixel_values, rtol=0, atol=0)


@pytest.mark.parametrize("layout", ["diffusers folder", "published safety_checker folder"])
def test_flags_and_scores_equal_diffusers(reference, checker_dirs, images, layout):
    folder = checker_dirs[0] if layout == "diffusers folder" else checker_dirs[1]
    checker = load_safety_checker(str(folder))
    pixels = checker.preprocess(images)
    flags, scores, special = diffusers_result(reference, pixels)
    ours = checker(pixels)
    assert any(flags) and not all(flags)  # the fixture made a mix
    assert ours.nsfw.tolist() == flags
    np.testing.assert_array_equal(ours.concept_scores, scores)
    np.testing.assert_array_equal(ours.special_scores, special)
    image, concept, care = reference.flagged_by_adjustment
    assert ours.special_scores[image, care] > 0 and 0 < ours.concept_scores[image, concept] <= 0.01
    assert flags[image]
    assert checker.check(images).nsfw.tolist() == flags


def test_threshold_set_to_flag_flags_every_image(reference, checker_dirs, images, tmp_path):
    folder = tmp_path / "model"
    shutil.copytree(checker_dirs[0], folder)
    path = folder / "safety_checker" / "model.safetensors"
    sd = load_file(path)
    sd["concept_embeds_weights"][7] = -1.0  # every cosine similarity is above -1
    save_file(sd, path)
    checker = load_safety_checker(str(folder))
    assert checker.check(images).nsfw.all()
    ref = diffusers_safety.StableDiffusionSafetyChecker.from_pretrained(folder / "safety_checker").eval()
    assert all(diffusers_result(ref, checker.preprocess(images))[0])


def test_every_weight_matters(checker_dirs, images, tmp_path):
    folder = tmp_path / "model"
    shutil.copytree(checker_dirs[0], folder)
    path = folder / "safety_checker" / "model.safetensors"
    original = load_file(path)
    pixels = load_safety_checker(str(folder)).preprocess(images[:2])
    base = load_safety_checker(str(folder))(pixels)
    # A key projection's bias shifts every attention logit of a query equally: softmax ignores it.
    for key in sorted(k for k in original if not k.endswith("self_attn.k_proj.bias")):
        sd = dict(original)
        sd[key] = original[key] + 0.5 * torch.randn(original[key].shape, generator=torch.Generator().manual_seed(1))
        save_file(sd, path)
        out = load_safety_checker(str(folder))(pixels)
        changed = not (np.array_equal(out.concept_scores, base.concept_scores)
                       and np.array_equal(out.special_scores, base.special_scores))
        assert changed, f"{key} does not change the scores"


def test_loads_from_an_fsspec_uri(checker_dirs, images):
    import fsspec

    fs = fsspec.filesystem("memory")
    for path in checker_dirs[1].iterdir():
        fs.pipe_file(f"/sc/safety_checker/{path.name}", path.read_bytes())
    remote = load_safety_checker("memory://sc/safety_checker")
    local = load_safety_checker(str(checker_dirs[1]))
    np.testing.assert_array_equal(remote.check(images[:2]).concept_scores, local.check(images[:2]).concept_scores)


def test_checker_errors_name_the_input(checker_dirs, tmp_path):
    with pytest.raises(CheckpointError, match="not a safety checker"):
        load_safety_checker(str(tmp_path))
    folder = tmp_path / "sc"
    shutil.copytree(checker_dirs[1], folder)
    (folder / "preprocessor_config.json").unlink()
    with pytest.raises(CheckpointError, match="no preprocessor_config.json"):
        load_safety_checker(str(folder))
    shutil.copy(checker_dirs[1] / "preprocessor_config.json", folder)
    sd = torch.load(folder / "pytorch_model.bin", weights_only=True)
    del sd["vision_model.vision_model.post_layernorm.bias"]
    torch.save(sd, folder / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match=r"pytorch_model\.bin.*missing.*post_layernorm\.bias"):
        load_safety_checker(str(folder))
    torch.save({"state_dict": object()}, folder / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match="refused to load"):
        load_safety_checker(str(folder))


# ----------------------------------------------------------------------------- blocklist


BLOCKLIST = """# things we do not make
red car
re:\\bbad\\s*word\\b
c++

re:^forbidden
"""


def test_blocklist_rules():
    bl = Blocklist.parse(BLOCKLIST, "rules.txt")
    assert len(bl) == 4
    assert str(bl.match("A RED  car at night")) == "'red car' (rules.txt, line 2)"
    assert bl.match("a red cart") is None and bl.match("bored car") is None
    assert bl.match("a landscape", "BadWord, blurry").line == 3
    assert bl.match("bad words") is None  # \b after 'word'
    assert bl.match("learning c++ today").text == "c++"
    assert bl.match("abc++ code") is None  # a word character before the phrase
    assert bl.match("not forbidden") is None and bl.match("Forbidden fruit").line == 6
    assert bl.match("# things we do not make") is None  # comments are not rules
    assert bl.check("ok", "red car") == "the negative prompt matches blocklist rule 'red car' (rules.txt, line 2)"
    assert bl.check("a cat", "") is None


def test_blocklist_from_uri_and_errors(tmp_path):
    import fsspec

    fsspec.filesystem("memory").pipe_file("/lists/rules.txt", BLOCKLIST.encode())
    assert load_blocklist("memory://lists/rules.txt").match("red car").line == 2
    bad = tmp_path / "bad.txt"
    bad.write_text("fine\n\nre:(unclosed\n")
    with pytest.raises(BlocklistError, match=r"bad\.txt, line 3: invalid regular expression 're:\(unclosed'"):
        load_blocklist(str(bad))
    with pytest.raises(BlocklistError, match="missing.txt: cannot read"):
        load_blocklist(str(tmp_path / "missing.txt"))


# ----------------------------------------------------------------------------- provenance


def _name(cn: str):
    from cryptography.x509 import Name, NameAttribute
    from cryptography.x509.oid import NameOID

    return Name([NameAttribute(NameOID.COMMON_NAME, cn), NameAttribute(NameOID.ORGANIZATION_NAME, "sdbatch tests")])


def _cert(subject, issuer, public_key, signing_key, ca: bool, issuer_key=None):
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes
    from cryptography.x509.oid import ExtendedKeyUsageOID

    now = datetime.datetime.now(datetime.timezone.utc)
    usage = dict(content_commitment=False, key_encipherment=False, data_encipherment=False, key_agreement=False,
                 encipher_only=False, decipher_only=False)
    builder = (x509.CertificateBuilder().subject_name(subject).issuer_name(issuer).public_key(public_key)
               .serial_number(x509.random_serial_number())
               .not_valid_before(now - datetime.timedelta(days=1)).not_valid_after(now + datetime.timedelta(days=30))
               .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
               .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=ca, crl_sign=ca, **usage), critical=True)
               .add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key), critical=False))
    if not ca:
        builder = (builder.add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.EMAIL_PROTECTION]), critical=False)
                   .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(issuer_key), critical=False))
    return builder.sign(signing_key, hashes.SHA256())


@pytest.fixture(scope="module")
def c2pa_material(tmp_path_factory):
    """A test CA and an ES256 leaf it issued: (folder with chain.pem and leaf.key, CA PEM)."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    ca_key, leaf_key = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())
    ca = _cert(_name("sdbatch test CA"), _name("sdbatch test CA"), ca_key.public_key(), ca_key, ca=True)
    leaf = _cert(_name("sdbatch signer"), ca.subject, leaf_key.public_key(), ca_key, ca=False,
                 issuer_key=ca_key.public_key())
    self_signed = _cert(_name("lonely"), _name("lonely"), leaf_key.public_key(), leaf_key, ca=True)  # as openssl req -x509
    pem = lambda c: c.public_bytes(serialization.Encoding.PEM)  # noqa: E731
    folder = tmp_path_factory.mktemp("c2pa")
    (folder / "chain.pem").write_bytes(pem(leaf) + pem(ca))
    (folder / "self-signed.pem").write_bytes(pem(self_signed))
    (folder / "leaf.key").write_bytes(leaf_key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))
    return folder, pem(ca).decode()


def _pixels(png: bytes) -> np.ndarray:
    with Image.open(io.BytesIO(png)) as im:
        return np.asarray(im.convert("RGB"))


def test_watermark_reads_back_with_the_library_decoder():
    image = natural_image(512, 512, seed=3)
    png = encode_png(image, "a cat\nSteps: 20")
    assert read_watermark(image) != WATERMARK_PAYLOAD
    assert not has_watermark(image)  # the decoder reads bytes from any image: about half the bits agree
    marked = mark_png(png)
    assert marked.watermark and not marked.c2pa
    pixels = _pixels(marked.png)
    assert read_watermark(pixels) == WATERMARK_PAYLOAD and has_watermark(pixels)
    assert not np.array_equal(pixels, image)
    # the library's own API, as SD's scripts call it (BGR)
    from imwatermark import WatermarkDecoder

    assert WatermarkDecoder("bytes", 136).decode(np.ascontiguousarray(pixels[:, :, ::-1]), "dwtDct") == b"StableDiffusionV1"
    unmarked = mark_png(png, watermark=False)
    assert not unmarked.watermark and np.array_equal(_pixels(unmarked.png), image)


def test_small_images_are_left_unmarked_and_reported():
    image = natural_image(128, 192)
    marked = mark_png(encode_png(image, "small"))
    assert not marked.watermark
    assert np.array_equal(_pixels(marked.png), image)


def test_xmp_and_parameters_read_back():
    parameters = "a café, ünïcode ✓\nNegative prompt: blur\nSteps: 20, Seed: 1"
    marked = mark_png(encode_png(natural_image(64, 64), parameters))
    with Image.open(io.BytesIO(marked.png)) as im:
        assert im.text["parameters"] == parameters
        xmp = im.info["xmp"]
    description = ET.fromstring(xmp).find(".//{http://www.w3.org/1999/02/22-rdf-syntax-ns#}Description")
    assert description.get(IPTC_EXT) == TRAINED_ALGORITHMIC_MEDIA
    assert description.get("{http://ns.adobe.com/xap/1.0/}CreatorTool").startswith("sdbatch ")
    assert mark_png(marked.png).png.count(XMP_KEY.encode()) == 1  # marking again replaces it


def test_c2pa_manifest_verifies_with_c2pas_reader(c2pa_material):
    import c2pa

    folder, ca_pem = c2pa_material
    signer = C2paSigner.from_files(str(folder / "chain.pem"), str(folder / "leaf.key"))
    image = natural_image(512, 512, seed=5)
    marked = mark_png(encode_png(image, "a lighthouse\nSteps: 20"), signer=signer, title="lighthouse.png")
    assert marked.c2pa and marked.watermark
    trust = c2pa.Context.from_dict({"verify": {"verify_trust": True}, "trust": {"trust_anchors": ca_pem}})
    reader = c2pa.Reader("image/png", io.BytesIO(marked.png), context=trust)
    assert reader.get_validation_state() == "Trusted", reader.get_validation_results()
    manifest = reader.get_active_manifest()
    assert manifest["claim_generator_info"][0]["name"] == "sdbatch"
    assert manifest["title"] == "lighthouse.png"
    (actions,) = [a["data"]["actions"] for a in manifest["assertions"] if a["label"].startswith("c2pa.actions")]
    assert actions[0]["action"] == "c2pa.created"
    assert actions[0]["digitalSourceType"] == TRAINED_ALGORITHMIC_MEDIA
    # the other marks survive signing
    pixels = _pixels(marked.png)
    assert read_watermark(pixels) == WATERMARK_PAYLOAD
    with Image.open(io.BytesIO(marked.png)) as im:
        assert im.text["parameters"] == "a lighthouse\nSteps: 20" and TRAINED_ALGORITHMIC_MEDIA.encode() in im.info["xmp"]
    # a changed pixel breaks the signature
    tampered = io.BytesIO()
    pixels = pixels.copy()
    pixels[0, 0] ^= 1
    Image.fromarray(pixels).save(tampered, format="PNG")
    changed = marked.png[:marked.png.index(b"IDAT") - 4] + tampered.getvalue()[tampered.getvalue().index(b"IDAT") - 4:]
    assert c2pa.Reader("image/png", io.BytesIO(changed), context=trust).get_validation_state() == "Invalid"


def test_c2pa_refuses_a_self_signed_certificate(c2pa_material):
    folder, _ = c2pa_material
    with pytest.raises(ProvenanceError, match="self-signed.pem.*c2pa refused"):
        C2paSigner.from_files(str(folder / "self-signed.pem"), str(folder / "leaf.key"))
    with pytest.raises(ProvenanceError, match="nope.pem: cannot read the C2PA certificate"):
        C2paSigner.from_files(str(folder / "nope.pem"), str(folder / "leaf.key"))
    with pytest.raises(ValueError, match="go together"):
        SafeguardSettings(c2pa_cert=str(folder / "chain.pem"))


def test_safeguards_drop_flagged_images_and_mark_the_others(reference, checker_dirs, images, c2pa_material, tmp_path):
    folder, _ = c2pa_material
    (tmp_path / "rules.txt").write_text("re:lighthouse\n")
    guards = Safeguards(SafeguardSettings(blocklist=str(tmp_path / "rules.txt"), safety_checker=str(checker_dirs[0]),
                                          c2pa_cert=str(folder / "chain.pem"), c2pa_key=str(folder / "leaf.key")))
    assert "rules.txt, line 1" in guards.check_prompt("A Lighthouse")
    assert guards.check_prompt("a cat") is None
    flags, _, _ = diffusers_result(reference, guards.checker.preprocess(images))
    outputs = guards.process(images, [f"prompt {i}" for i in range(len(images))])
    assert [o.nsfw for o in outputs] == flags
    for image, out in zip(images, outputs):
        if out.nsfw:
            assert out.png is None and not out.watermark and not out.c2pa
        else:
            assert out.c2pa and out.watermark == (image.shape[0] * image.shape[1] >= 256 * 256)
            assert _pixels(out.png).shape == image.shape
