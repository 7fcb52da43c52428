#!/usr/bin/env python
"""Build an offline CLIP tokenizer folder (vocab.json + merges.txt + configs).

Why: no weights or hub files can be downloaded on our machines, but the exact
CLIP BPE vocabulary ships inside the open_clip_torch wheel on PyPI as
``open_clip/bpe_simple_vocab_16e6.txt.gz``.  This script rebuilds the
encoder table the same way CLIP's own ``SimpleTokenizer`` does and writes it
in the layout ``transformers.CLIPTokenizer.from_pretrained`` expects.

Usage:
    python scripts/make_clip_tokenizer.py --source open_clip_torch-*.whl
    python scripts/make_clip_tokenizer.py --source bpe_simple_vocab_16e6.txt.gz --out DIR
"""
from __future__ import annotations

import argparse
import gzip
import io
import json
import zipfile
from pathlib import Path

BPE_MEMBER = "open_clip/bpe_simple_vocab_16e6.txt.gz"
N_MERGES = 49152 - 256 - 2  # CLIP keeps this many merge rules
BOS, EOS = "<|startoftext|>", "<|endoftext|>"
VOCAB_SIZE = 49408


def byte_to_unicode() -> dict[int, str]:
    """Map every byte to a printable unicode char (GPT-2/CLIP convention).

    Printable latin bytes map to themselves; the rest are shifted to code
    points from 256 upwards so that no BPE symbol is whitespace/control.
    Insertion order (printable first) is the order of the first 256 ids.
    """
    keep = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1))
    )
    # Order matters: the vocab lists printable bytes first (in byte order),
    # then the remapped ones, exactly as the dict is filled here.
    table = {b: chr(b) for b in keep}
    shift = 0
    for b in range(256):
        if b not in table:
            table[b] = chr(256 + shift)
            shift += 1
    return table


def read_bpe_text(source: Path) -> str:
    """Return the decompressed BPE file from a .txt.gz or from a wheel/zip."""
    raw = source.read_bytes()
    if zipfile.is_zipfile(io.BytesIO(raw)):
        with zipfile.ZipFile(io.BytesIO(raw)) as zf:
            names = [n for n in zf.namelist() if n.endswith("bpe_simple_vocab_16e6.txt.gz")]
            if not names:
                raise SystemExit(f"{source}: no {BPE_MEMBER} inside this archive")
            raw = zf.read(names[0])
    return gzip.decompress(raw).decode("utf-8")


def build(text: str) -> tuple[dict[str, int], list[str]]:
    """Vocab and merge list, in CLIP's order (49408 entries)."""
    lines = text.split("\n")
    merge_lines = lines[1 : N_MERGES + 1]  # line 0 is a version header
    pairs = [tuple(line.split()) for line in merge_lines]
    symbols = list(byte_to_unicode().values())
    tokens = symbols + [s + "</w>" for s in symbols]
    tokens += ["".join(p) for p in pairs]
    tokens += [BOS, EOS]
    if len(tokens) != VOCAB_SIZE:
        raise SystemExit(f"built {len(tokens)} tokens, expected {VOCAB_SIZE}")
    vocab = {tok: i for i, tok in enumerate(tokens)}
    if len(vocab) != VOCAB_SIZE:
        raise SystemExit("duplicate tokens in built vocabulary")
    return vocab, [" ".join(p) for p in pairs]


def write(folder: Path, vocab: dict[str, int], merges: list[str]) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    # transformers skips the first line of merges.txt as a header.
    (folder / "merges.txt").write_text(
        "#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8"
    )
    specials = {
        "bos_token": BOS,
        "eos_token": EOS,
        "unk_token": EOS,
        "pad_token": EOS,  # SD 1.x pads with end-of-text
    }
    config = {
        "tokenizer_class": "CLIPTokenizer",
        "model_max_length": 77,
        "do_lower_case": True,
        "errors": "replace",
        "clean_up_tokenization_spaces": False,
        "add_prefix_space": False,
        **specials,
    }
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")
    (folder / "special_tokens_map.json").write_text(json.dumps(specials, indent=2) + "\n")


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--source", type=Path, required=True,
                    help="bpe_simple_vocab_16e6.txt.gz, or a wheel/zip that contains it")
    ap.add_argument("--out", type=Path, default=Path("src/xattn/assets/clip_tokenizer"))
    args = ap.parse_args(argv)
    vocab, merges = build(read_bpe_text(args.source))
    write(args.out, vocab, merges)
    print(f"wrote {len(vocab)} tokens and {len(merges)} merges to {args.out}")


if __name__ == "__main__":
    main()
