"""Kept importable: weighted prompts now live in :mod:`xattn.prompts` (A1111 and compel dialects)."""

from .prompts import (  # noqa: F401
    Fragment,
    PromptSyntaxError,
    PromptWarning,
    UnsupportedSyntaxError,
    WeightedPrompt,
    WeightedSpan,
    parse_attention,
    parse_prompt,
)

__all__ = [
    "Fragment",
    "PromptSyntaxError",
    "PromptWarning",
    "UnsupportedSyntaxError",
    "WeightedPrompt",
    "WeightedSpan",
    "parse_attention",
    "parse_prompt",
]
