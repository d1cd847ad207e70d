import importlib.util
import warnings
from pathlib import Path

import pytest
import torch
from transformers import CLIPTokenizer

from sdbatch.model.tokenizer import VOCAB_DIR, Tokenizer

PROMPTS = [
    "a photo of a cat",
    "",
    "A Photo Of A CAT",
    "masterpiece, (best quality:1.2), [ugly], 8k uhd, f/1.8, 35mm",
    "  lots   of\twhitespace\nand newlines  ",
    "Café crème brûlée, naïve façade, Straße",
    "東京の夜景, 猫の写真",
    "a cat 🐱 wearing a hat 🎩👒 on the moon 🌕",
    "it's a dog's life, we're done, they'll see",
    "Tom &amp; Jerry <html> \"quoted\" 'single'",
    "numbers 1234567890 and 3.14159 and 1e-4",
    "word " * 90,
    "x" * 400,
    "<|startoftext|> inside <|endoftext|> prompt",
]


def reference(tokenizer: CLIPTokenizer, prompts: list[str]) -> torch.Tensor:
    """What diffusers' StableDiffusionPipeline.encode_prompt does with its tokenizer."""
    return tokenizer(prompts, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids


def test_known_ids():
    tokens = Tokenizer()(["a photo of a cat"])
    assert tokens.dtype == torch.long and tokens.shape == (1, 77)
    assert tokens[0, :7].tolist() == [49406, 320, 1125, 539, 320, 2368, 49407]
    assert (tokens[0, 7:] == 49407).all()


def test_matches_diffusers_tokenizer(tiny_diffusers_dir):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ours = Tokenizer()(PROMPTS)
        folder = Tokenizer(tiny_diffusers_dir / "tokenizer")(PROMPTS)
    diffusers_tok = CLIPTokenizer.from_pretrained(str(tiny_diffusers_dir / "tokenizer"))
    shipped = CLIPTokenizer.from_pretrained(str(VOCAB_DIR), model_max_length=77)
    assert torch.equal(ours, reference(diffusers_tok, PROMPTS))
    assert torch.equal(ours, reference(shipped, PROMPTS))
    assert torch.equal(folder, ours)
    assert torch.equal(ours[0], ours[2])  # CLIP lower-cases
    assert len({tuple(row.tolist()) for row in ours}) == len(PROMPTS) - 1


def test_single_string_and_empty():
    tok = Tokenizer()
    assert torch.equal(tok("a photo of a cat"), tok(["a photo of a cat"]))
    empty = tok([""])[0]
    assert empty[0] == 49406 and (empty[1:] == 49407).all()
    assert tok([]).shape == (0, 77)


def test_truncation_keeps_eos_and_warns_once():
    tok = Tokenizer()
    long_prompt = " ".join(f"word{i}" for i in range(100))
    with pytest.warns(UserWarning, match="truncated to 77"):
        first = tok([long_prompt, "short"])
    assert first[0, 0] == 49406 and first[0, -1] == 49407
    assert (first[0, 1:-1] != 49407).all()  # 75 content tokens, no padding
    full = tok._tok(long_prompt)["input_ids"]
    assert first[0, :76].tolist() == full[:76]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        again = tok([long_prompt])
    assert torch.equal(again[0], first[0])


def test_exactly_77_tokens_is_not_truncated():
    tok = Tokenizer()
    prompt = " ".join(["cat"] * 75)  # "cat</w>" is one token: 75 + bos + eos = 77
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        tokens = tok([prompt])[0]
    assert tokens[0] == 49406 and tokens[-1] == 49407 and (tokens[1:-1] == tokens[1]).all()


def test_shipped_vocab_is_derived_from_the_openai_file(tmp_path):
    script = Path(__file__).parents[1] / "scripts" / "make_vocab.py"
    spec = importlib.util.spec_from_file_location("make_vocab", script)
    make_vocab = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(make_vocab)
    if not make_vocab.DEFAULT_SOURCE.exists():
        pytest.skip(f"{make_vocab.DEFAULT_SOURCE} is not available here")
    make_vocab.main(make_vocab.DEFAULT_SOURCE, tmp_path)
    for name in ("vocab.json", "merges.txt"):
        assert (tmp_path / name).read_bytes() == (VOCAB_DIR / name).read_bytes()
