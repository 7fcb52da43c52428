"""Data files shipped inside the package (offline CLIP tokenizer, ...)."""
from __future__ import annotations

from importlib import resources
from pathlib import Path


def clip_tokenizer_path() -> Path:
    """Folder with CLIP's real BPE vocab, loadable by CLIPTokenizer.from_pretrained.

    Built by scripts/make_clip_tokenizer.py, so no hub download is ever needed.
    """
    folder = resources.files("xattn.assets").joinpath("clip_tokenizer")
    path = Path(str(folder))
    if not (path / "vocab.json").is_file():
        raise FileNotFoundError(
            f"CLIP tokenizer files missing in {path}; run scripts/make_clip_tokenizer.py"
        )
    return path
