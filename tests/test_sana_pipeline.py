"""A tiny SanaPipeline end to end: Gemma token maps behind the instruction, rows, word maps, Reweight, the CLI.

The tokenizer is transformers' ``GemmaTokenizer`` with a vocabulary trained
offline (tiny_models.gemma_tokenizer), the text encoder a random Gemma2. The
references share nothing with xattn: the token ids the text encoder actually
received (selected as the pipeline documents: ``<bos>`` and the last
``length - 1`` slots), the stock pipeline's output, and a cross-attention
processor written here that zeroes a word's columns in float64.
"""

from __future__ import annotations

import inspect

import pytest
import torch
from typer.testing import CliRunner

import xattn
from tiny_models import build_sana, encoder_input_ids, load_sana
from xattn.adapters import adapter_for

PROMPT = "A red circle on a tree"
LENGTH = 24
INSTRUCTION = ["Given a user prompt, draw it:", "User Prompt: "]
CALL = dict(num_inference_steps=3, height=32, width=64, guidance_scale=4.5, max_sequence_length=LENGTH,
            use_resolution_binning=False, output_type="latent")


@pytest.fixture(scope="module")
def sana_path(tmp_path_factory):
    return build_sana(tmp_path_factory.mktemp("sana") / "pipe")


@pytest.fixture(scope="module")
def pipe(sana_path):
    return load_sana(sana_path)


def sample(pipe, prompt=PROMPT, **options):
    options = {"complex_human_instruction": INSTRUCTION, **options}
    with torch.no_grad():
        return pipe(prompt, generator=torch.Generator().manual_seed(0), **CALL, **options).images


def received_ids(pipe, prompt, **options) -> list[str]:
    """The pieces at each slot of the conditional text, from the ids the text encoder received."""
    ids, _ = encoder_input_ids(pipe, prompt, max_sequence_length=LENGTH, **options)
    selected = [ids[0]] + ids[len(ids) - (LENGTH - 1):]  # <bos>, then the last LENGTH - 1 slots
    return pipe.tokenizer.convert_ids_to_tokens(selected)


def slots_of(pieces: list[str], word: str, after: int = 0) -> list[int]:
    """Slots after ``after`` whose pieces spell `` word`` (a bare ``▁`` first belongs to it): read off the pieces."""
    for start in range(after + 1, len(pieces)):
        text, end = "", start
        while end < len(pieces) and len(text) < len(word) + 1:
            text += pieces[end]
            end += 1
            if text.replace("\u2581", " ").strip() == word and pieces[start].startswith("\u2581"):
                return list(range(start, end))
    raise AssertionError(f"{word} not in {pieces}")


DEFAULT_INSTRUCTION = inspect.signature(
    __import__("diffusers").SanaPipeline.__call__).parameters["complex_human_instruction"].default


@pytest.mark.parametrize("instruction", [INSTRUCTION, DEFAULT_INSTRUCTION, None], ids=["short", "default", "none"])
def test_token_maps_put_words_where_the_encoder_saw_them(pipe, instruction):
    pieces = received_ids(pipe, PROMPT, complex_human_instruction=instruction)
    encoded = xattn.adapters.Encoded([PROMPT], [None], 1, None, None,
                                     options={"complex_human_instruction": instruction})
    token_map = adapter_for(pipe).token_map(pipe, PROMPT, LENGTH, encoded)
    assert [w.text for w in token_map.words] == ["a", "red", "circle", "on", "a", "tree"]
    for word in ("red", "circle", "tree"):
        assert token_map.indices(word) == slots_of(pieces, word), (word, pieces)
    assert len(token_map.indices("red")) > 1  # a word split into several pieces
    assert token_map.indices("a#2") == slots_of(pieces, "a", after=token_map.indices("on")[-1])
    assert token_map.indices("<start>") == [0] and pieces[0] == "<bos>"


def test_no_hooks_is_the_stock_pipeline_and_linear_attention_stays(pipe):
    stock = sample(pipe)
    with xattn.hooks(pipe):
        assert (sample(pipe) - stock).abs().max() <= 1e-5
    assert adapter_for(pipe).family == "sana"
    assert {s.kind for s in xattn.sites(pipe)} == {"cross"}


def test_rows_steps_and_word_maps_on_the_latent_grid(pipe):
    seen = []
    capture = xattn.Capture()
    keep = xattn.Hook("probs", lambda p, ctx: seen.append((ctx.step, ctx.num_steps, ctx.res, ctx.layout.rows)),
                      "kind=cross")
    with xattn.hooks(pipe, capture, keep):
        sample(pipe, negative_prompt="blurry")
    assert [(step, count) for step, count, *_ in seen] == [(s, 3) for s in range(3) for _ in range(2)]
    assert {entry[2:] for entry in seen} == {((8, 16), (xattn.Row(False, 0, 0), xattn.Row(True, 0, 0)))}
    maps = capture.maps()
    assert maps.resolutions == [(8, 16)] and maps.image_size == (32, 64) and maps.num_steps == 3
    assert maps.word("circle").shape == (32, 64)
    assert maps.word("circle", normalize=False, size=(8, 16)).shape == (8, 16)


class ZeroColumns:
    """Sana's cross-attention in float64 with the conditional row's ``columns`` zeroed after the softmax."""

    def __init__(self, columns: list[int]):
        self.columns = columns

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None):
        def linear(layer, x):
            return torch.nn.functional.linear(x.double(), layer.weight.double(), layer.bias.double())

        b = hidden_states.shape[0]
        q, k, v = (linear(attn.to_q, hidden_states), linear(attn.to_k, encoder_hidden_states),
                   linear(attn.to_v, encoder_hidden_states))
        q, k, v = (t.view(b, t.shape[1], attn.heads, -1).transpose(1, 2) for t in (q, k, v))
        logits = q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5 + attention_mask.double().view(b, 1, 1, -1)
        probs = logits.softmax(-1)
        probs[1:, :, :, self.columns] = 0  # rows: [negative, prompt]
        out = (probs @ v).transpose(1, 2).reshape(b, hidden_states.shape[1], -1)
        return linear(attn.to_out[0], out).float()


def test_reweight_zero_equals_a_float64_reference(pipe):
    red = slots_of(received_ids(pipe, PROMPT, complex_human_instruction=INSTRUCTION), "red")
    with xattn.hooks(pipe, xattn.Reweight({"red": 0})):
        ours = sample(pipe)
    original = pipe.transformer.attn_processors
    pipe.transformer.set_attn_processor({name: ZeroColumns(red) if ".attn2." in name else processor
                                         for name, processor in original.items()})
    try:
        reference = sample(pipe)
    finally:
        pipe.transformer.set_attn_processor(original)
    assert (ours - reference).abs().max() <= 1e-4
    assert (ours - sample(pipe)).abs().max() > 1e-3  # zeroing the word changed the sample


def test_cli_maps_and_generate_on_a_saved_sana_folder(sana_path, tmp_path):
    from xattn.capture.export import load_maps
    from xattn.cli import app

    runner = CliRunner()
    out = tmp_path / "maps"
    result = runner.invoke(app, ["maps", "a red circle", "--model", str(sana_path), "--out", str(out),
                                 "--steps", "2", "--size", "32", "--seed", "1"], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    maps = load_maps(out)
    # --size is the size run: the CLI turns off diffusers' resolution binning (which would run the nearest
    # trained aspect ratio, 512 x 512 here, and resize the image back) so the maps are those of a 32 x 32 image.
    assert maps.words() == ["a", "red", "circle"] and maps.image_size == (32, 32)
    assert maps.resolutions == [(8, 8)] and maps.word("circle").shape == (32, 32)
    result = runner.invoke(app, ["generate", "a red circle", "--model", str(sana_path), "--out",
                                 str(tmp_path / "gen"), "--steps", "2", "--size", "32", "--seed", "1"],
                           catch_exceptions=False)
    assert result.exit_code == 0, result.output
