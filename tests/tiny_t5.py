"""A tiny T5 tokenizer and encoder, built offline.

The tokenizer is a sentencepiece-style Unigram model built with the
``tokenizers`` package from a short word list (whole words, then single
characters), wrapped as transformers' ``T5Tokenizer`` (no ``sentencepiece``
package needed): ``▁`` marks word starts, ``</s>`` ends the text, ``<pad>``
pads it, no start token. Words outside the list split into several pieces.
"""

from __future__ import annotations

import torch
from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors
from transformers import T5Config, T5EncoderModel, T5Tokenizer

WORDS = ("a an the red blue green circle square triangle and on of photo cat cats dog in with big small "
         "painting picture house tree sky").split()
MAX_LENGTH = 32
ALPHABET = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789.,!?'"


def vocabulary() -> list[tuple[str, float]]:
    """Unigram pieces and log-probabilities: whole words (``▁red``), then single characters for the rest."""
    specials = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0)]
    words = [("\u2581" + word, -2.0) for word in WORDS]
    characters = [(c, -6.0) for c in ALPHABET] + [("\u2581", -4.0)]
    return specials + words + characters


def t5_tokenizer(max_length: int = MAX_LENGTH) -> T5Tokenizer:
    model = Tokenizer(models.Unigram(vocabulary(), unk_id=2, byte_fallback=False))
    model.normalizer = normalizers.Sequence([normalizers.NFKC(), normalizers.Replace(Regex(" {2,}"), " ")])
    model.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="always")
    model.decoder = decoders.Metaspace(replacement="\u2581", prepend_scheme="always")
    model.post_processor = processors.TemplateProcessing(single="$A </s>", pair="$A </s> $B </s>",
                                                         special_tokens=[("</s>", 1)])
    return T5Tokenizer(tokenizer_object=model, eos_token="</s>", unk_token="<unk>", pad_token="<pad>", extra_ids=0,
                       model_max_length=max_length)


def t5_encoder(hidden: int = 16, seed: int = 5) -> T5EncoderModel:
    torch.manual_seed(seed)
    return T5EncoderModel(T5Config(vocab_size=len(vocabulary()), d_model=hidden, d_kv=8, d_ff=32, num_layers=1,
                                   num_heads=2, relative_attention_num_buckets=8, pad_token_id=0, eos_token_id=1))
