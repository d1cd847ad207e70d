"""CLIP tokenizer: prompts -> (B, 77) token ids, padded and truncated as SD v1.x expects."""

import warnings
from pathlib import Path

import torch
from transformers import CLIPTokenizer

VOCAB_DIR = Path(__file__).parent / "vocab"


class Tokenizer:
    """Wraps transformers' CLIPTokenizer over the shipped vocabulary (or a diffusers folder's).

    Every prompt becomes <|startoftext|> + tokens + <|endoftext|>, padded with the pad token
    (<|endoftext|> for SD v1.x) to `length`; longer prompts are cut to `length` with
    <|endoftext|> kept last, and the first cut warns.
    """

    def __init__(self, folder: str | Path | None = None, length: int = 77):
        self.length = length
        # we truncate ourselves: a huge model_max_length silences transformers' length warning
        self._tok = CLIPTokenizer.from_pretrained(
            str(folder if folder is not None else VOCAB_DIR), model_max_length=10**9, local_files_only=True
        )
        self._warned = False

    def __call__(self, prompts: str | list[str]) -> torch.Tensor:
        if isinstance(prompts, str):
            prompts = [prompts]
        ids = self._tok(list(prompts), add_special_tokens=True)["input_ids"] if prompts else []
        out = torch.full((len(ids), self.length), self._tok.pad_token_id, dtype=torch.long)
        for row, seq in enumerate(ids):
            if len(seq) > self.length:
                if not self._warned:
                    warnings.warn(
                        f"prompt {row} has {len(seq)} tokens; prompts are truncated to {self.length} "
                        f"(further truncations are not reported)",
                        stacklevel=2,
                    )
                    self._warned = True
                seq = seq[: self.length - 1] + [self._tok.eos_token_id]
            out[row, : len(seq)] = torch.tensor(seq)
        return out

