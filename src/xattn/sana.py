"""Where a prompt's words sit in Sana's text sequence (Gemma tokens behind an instruction).

``SanaPipeline`` lower-cases and strips the prompt, puts its "complex human
instruction" (a few lines asking for an enhanced prompt, ending in
``"User Prompt: "``) in front of it, tokenizes the whole with Gemma's
tokenizer (``<bos>``, then sentencepiece pieces, ``▁`` for a space, no end
token, padding on the right) to ``n_instruction + length - 2`` slots, and
keeps slot 0 (``<bos>``) and the last ``length - 1`` slots. The instruction's
own tokens fall out again, except that they shaped the prompt's embeddings
(Gemma reads left to right).

:func:`sana_token_map` lays the prompt out the same way: a
:class:`~xattn.tokens.TokenMap` of the instruction and the prompt together,
then only the prompt's words, their slots moved to where the pipeline's
selection puts them. Without an instruction it is the plain map of the
processed prompt.
"""

from __future__ import annotations

import copy

from .tokens import TokenMap, TokenizerMismatchError, Word, normal_key, split_words


def processed_prompt(pipe, prompt: str, clean_caption: bool = False) -> str:
    """The text Sana tokenizes for ``prompt`` (its own ``_text_preprocessing``: lower-cased and stripped)."""
    process = getattr(pipe, "_text_preprocessing", None)
    return process(prompt, clean_caption=clean_caption)[0] if process is not None else prompt.lower().strip()


def sana_token_map(pipe, prompt: str, length: int, options: dict) -> TokenMap:
    """The token map of ``prompt`` in a Sana text sequence of ``length`` slots.

    ``options``: what the pipeline gave ``encode_prompt`` (``complex_human_instruction``,
    ``clean_caption``). ``.prompt`` is the processed text (spans are counted in it),
    ``.written`` the prompt as given.
    """
    tokenizer = pipe.tokenizer
    text = processed_prompt(pipe, prompt, bool(options.get("clean_caption")))
    instruction = options.get("complex_human_instruction")
    if not instruction:
        token_map = TokenMap(tokenizer, text, max_length=length)
        token_map.written = prompt
        return token_map
    lead = "\n".join(instruction)
    skipped = len(tokenizer.encode(lead)) - 2  # slots 1 .. skipped of the whole sequence are cut off
    whole = TokenMap(tokenizer, lead + text, max_length=skipped + length)
    return _after(whole, len(lead), skipped, length, prompt, text)


def _after(whole: TokenMap, start: int, skipped: int, length: int, written: str, text: str) -> TokenMap:
    """``whole``'s words from character ``start`` on, as a map of ``text`` whose slots lost ``skipped``."""
    words, counts = [], {}
    for word in whole.words:
        if word.end <= start:
            continue
        if word.start < start:  # the instruction's last word ran into the prompt's first
            raise TokenizerMismatchError(f"the instruction and the prompt {text!r} share the word {word.text!r}; "
                                         "end the instruction with a space or a new line")
        slots = tuple(slot - skipped for slot in word.slots if slot > skipped)
        if not slots:
            continue
        counts[word.key] = counts.get(word.key, 0) + 1
        words.append(Word(word.text, word.start - start, word.end - start, slots, counts[word.key]))
    expected = [normal_key(w) for w, _, _ in split_words(text, whole._whole_words)]
    if [w.key for w in words] != expected[: len(words)]:
        raise TokenizerMismatchError(f"Sana's instruction changes how {text!r} splits into words: "
                                     f"{[w.text for w in words]} against {expected}")
    mapped = copy.copy(whole)
    mapped.prompt, mapped.written, mapped.max_length = text, written, length
    mapped.words = words
    mapped.pieces = whole.pieces[skipped:]
    mapped.end_slot = whole.end_slot - skipped
    mapped.cut_words = list(whole.cut_words)  # the instruction comes first: only the prompt's words are ever cut
    mapped.cut_from = None if whole.cut_from is None else max(whole.cut_from - start, 0)
    return mapped


__all__ = ["processed_prompt", "sana_token_map"]
