"""The shipped CLIP tokenizer must reproduce CLIP's ids offline."""
import pytest

from xattn.assets import clip_tokenizer_path

transformers = pytest.importorskip("transformers")

EXPECTED = [49406, 320, 1125, 539, 320, 2368, 49407]


@pytest.fixture(scope="module")
def slow_tok():
    return transformers.CLIPTokenizer.from_pretrained(clip_tokenizer_path())


def test_path_is_real_folder():
    path = clip_tokenizer_path()
    assert path.is_dir()
    assert (path / "vocab.json").is_file() and (path / "merges.txt").is_file()


def test_known_ids(slow_tok):
    assert slow_tok("a photo of a cat").input_ids == EXPECTED
    assert len(slow_tok) == 49408
    assert slow_tok.model_max_length == 77
    assert slow_tok.bos_token == "<|startoftext|>"
    assert slow_tok.eos_token == slow_tok.pad_token == slow_tok.unk_token == "<|endoftext|>"


def test_world_words_are_single_tokens(slow_tok):
    ids = slow_tok("a red circle and a blue square").input_ids
    assert ids == [49406, 320, 736, 7117, 537, 320, 1746, 3999, 49407]


def test_padding_uses_endoftext(slow_tok):
    ids = slow_tok("a photo of a cat", padding="max_length", max_length=77).input_ids
    assert len(ids) == 77
    assert ids[:7] == EXPECTED
    assert set(ids[7:]) == {49407}


def test_fast_tokenizer_matches(slow_tok):
    try:
        fast = transformers.CLIPTokenizerFast.from_pretrained(clip_tokenizer_path())
    except Exception as exc:  # pragma: no cover - depends on installed backends
        pytest.skip(f"fast tokenizer cannot be built from these files: {exc}")
    for text in ["a photo of a cat", "A Red circle, and a BLUE square!", "two  yellow\ttriangles"]:
        assert fast(text).input_ids == slow_tok(text).input_ids
