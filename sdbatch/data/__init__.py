"""Synthetic training data for sdbatch's built-in demo model, and a checker of prompt adherence."""

from .adherence import check, read_attributes
from .shapes import (
    Attributes,
    evaluation_prompts,
    held_out_triples,
    parse_prompt,
    prompt_text,
    read_metadata,
    render,
    write_dataset,
)

__all__ = [
    "Attributes",
    "check",
    "evaluation_prompts",
    "held_out_triples",
    "parse_prompt",
    "prompt_text",
    "read_attributes",
    "read_metadata",
    "render",
    "write_dataset",
]
