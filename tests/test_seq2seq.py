"""Encoder–decoder models (xattn.seq2seq): T5 and BART built offline with random weights.

Stock parity with no hook (tokens equal, scores within 1e-5, in fact equal),
captured cross maps against a float64 reference from each module's own
projections (teacher-forced), the step clock counting decoding steps (cache
and no cache, beams), Reweight against a probs hook scaling the word's
columns by hand, everything put back after the session and after an
exception, and named errors for what xattn does not understand.
"""

from __future__ import annotations

import copy

import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers, processors
from transformers import BartConfig, BartForConditionalGeneration, PreTrainedTokenizerFast, T5Config
from transformers import T5ForConditionalGeneration

import xattn
from xattn import seq2seq
from tiny_t5 import t5_encoder, t5_tokenizer, vocabulary

SOURCES = ["a red circle", "the big cat on a tree"]
STEPS = 5
GENERATE = dict(max_new_tokens=STEPS, min_new_tokens=STEPS, do_sample=False, output_scores=True, return_dict_in_generate=True)

BART_WORDS = "a an the red blue green circle square big small cat dog on in of tree house sky".split()


def bart_tokenizer() -> PreTrainedTokenizerFast:
    """A word-level tokenizer laid out as BART's: ``<s>`` words ``</s>``, ``<pad>`` = 1."""
    vocab = {"<s>": 0, "<pad>": 1, "</s>": 2, "<unk>": 3, **{w: 4 + i for i, w in enumerate(BART_WORDS)}}
    model = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    model.pre_tokenizer = pre_tokenizers.Whitespace()
    model.post_processor = processors.TemplateProcessing(single="<s> $A </s>", special_tokens=[("<s>", 0), ("</s>", 2)])
    return PreTrainedTokenizerFast(tokenizer_object=model, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                                   unk_token="<unk>", model_max_length=32)


def tiny_t5(implementation: str) -> T5ForConditionalGeneration:
    torch.manual_seed(0)
    config = T5Config(vocab_size=len(vocabulary()), d_model=16, d_kv=8, d_ff=32, num_layers=2, num_heads=2,
                      relative_attention_num_buckets=8, pad_token_id=0, eos_token_id=1, decoder_start_token_id=0)
    model = T5ForConditionalGeneration(config).eval()
    model.set_attn_implementation(implementation)
    return model


def tiny_bart(implementation: str) -> BartForConditionalGeneration:
    torch.manual_seed(1)
    config = BartConfig(vocab_size=4 + len(BART_WORDS), d_model=16, encoder_layers=1, decoder_layers=2,
                        encoder_attention_heads=2, decoder_attention_heads=2, encoder_ffn_dim=32, decoder_ffn_dim=32,
                        max_position_embeddings=64, pad_token_id=1, bos_token_id=0, eos_token_id=2,
                        decoder_start_token_id=2, forced_bos_token_id=None, forced_eos_token_id=None,
                        init_std=0.3)
    model = BartForConditionalGeneration(config).eval()
    model.set_attn_implementation(implementation)
    return model


FAMILIES = {"t5": (tiny_t5, t5_tokenizer), "bart": (tiny_bart, bart_tokenizer)}


@pytest.fixture(params=[(family, impl) for family in FAMILIES for impl in ("eager", "sdpa")],
                ids=lambda p: f"{p[0]}-{p[1]}")
def setup(request):
    family, implementation = request.param
    make_model, make_tokenizer = FAMILIES[family]
    tokenizer = make_tokenizer()
    return family, make_model(implementation), tokenizer, tokenizer(SOURCES, return_tensors="pt", padding=True)


def _max_score_diff(a, b) -> float:
    """The largest score difference; equal entries (min_new_tokens' -inf for the end token too) differ by 0."""
    return max(torch.where(x == y, 0.0, (x - y).abs()).max().item() for x, y in zip(a.scores, b.scores))


def _cross_modules(model) -> dict[str, torch.nn.Module]:
    modules = dict(model.named_modules())
    return {site.name: modules[site.name] for site in xattn.sites(model) if site.kind == "cross"}


# -- parity and sites ---------------------------------------------------------------------------------------------
def test_sites_are_the_decoders_attention_named_by_module_path(setup):
    family, model, _, _ = setup
    listed = xattn.sites(model)
    cross = [s.name for s in listed if s.kind == "cross"]
    assert len(cross) == 2 and len([s for s in listed if s.kind == "self"]) == 2
    if family == "t5":
        assert cross[0] == "decoder.block.0.layer.1.EncDecAttention"
    else:
        assert cross[0] == "model.decoder.layers.0.encoder_attn"
    assert all(s.heads == 2 and s.head_dim == 8 for s in listed)


def test_no_hook_is_bit_for_bit_stock(setup):
    _, model, tokenizer, batch = setup
    stock = model.generate(**batch, **GENERATE)
    idle = xattn.Hook("probs", lambda p, ctx: p * 0, selector="steps=100:200")  # selected, never active
    with xattn.hooks(model, tokenizer=tokenizer):
        plain = model.generate(**batch, **GENERATE)
    with xattn.hooks(model, idle, tokenizer=tokenizer), pytest.warns(UserWarning, match="ran at no attention call"):
        selected = model.generate(**batch, **GENERATE)
    for out in (plain, selected):
        assert torch.equal(out.sequences, stock.sequences)
        assert _max_score_diff(out, stock) == 0.0


def test_an_observing_hook_keeps_the_tokens(setup):
    _, model, tokenizer, batch = setup
    stock = model.generate(**batch, **GENERATE)
    with xattn.hooks(model, xattn.Hook("probs", lambda p, ctx: None), tokenizer=tokenizer):
        explicit = model.generate(**batch, **GENERATE)
    assert torch.equal(explicit.sequences, stock.sequences)
    assert _max_score_diff(explicit, stock) <= 1e-5


# -- captured maps against float64 ---------------------------------------------------------------------------------
def _reference_maps(family, model, batch, sequences) -> dict[str, torch.Tensor]:
    """Cross maps [b, h, T, S] of a teacher-forced float64 pass, from each module's own projections."""
    double = copy.deepcopy(model).double()
    inputs: dict[str, tuple] = {}
    handles = []
    for name, module in _cross_modules(double).items():
        def grab(module, args, kwargs, name=name):
            hidden = args[0] if args else kwargs["hidden_states"]
            inputs[name] = (module, hidden, kwargs["key_value_states"])
        handles.append(module.register_forward_pre_hook(grab, with_kwargs=True))
    with torch.no_grad():
        double(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
               decoder_input_ids=sequences[:, :-1])
    for handle in handles:
        handle.remove()
    keep = batch["attention_mask"].bool()[:, None, None, :]  # [b, 1, 1, S]
    maps = {}
    for name, (module, hidden, source) in inputs.items():
        if family == "t5":
            q, k, heads, scaling = module.q(hidden), module.k(source), module.n_heads, 1.0
        else:
            q, k, heads, scaling = module.q_proj(hidden), module.k_proj(source), module.num_heads, module.scaling
        q = q.view(q.shape[0], q.shape[1], heads, -1).transpose(1, 2)
        k = k.view(k.shape[0], k.shape[1], heads, -1).transpose(1, 2)
        scores = (q @ k.transpose(-1, -2) * scaling).masked_fill(~keep, float("-inf"))
        maps[name] = scores.softmax(dim=-1)
    return maps


def test_captured_maps_equal_a_float64_reference(setup):
    family, model, tokenizer, batch = setup
    capture = xattn.Capture(storage_dtype=torch.float32)
    with xattn.hooks(model, capture, tokenizer=tokenizer):
        out = model.generate(**batch, **GENERATE)
    captured = seq2seq.maps(capture)
    reference = _reference_maps(family, model, batch, out.sequences)
    assert set(captured.per_site) == set(reference)
    steps = out.sequences.shape[1] - 1
    assert captured.steps == list(range(steps))
    for name, expected in reference.items():
        got = captured.per_site[name]  # [rows, heads, T, S]
        assert got.shape == expected.shape
        torch.testing.assert_close(got.double(), expected, atol=1e-5, rtol=0)
        torch.testing.assert_close(got.sum(-1), torch.ones(got.shape[:-1]), atol=1e-5, rtol=0)
        padding = ~batch["attention_mask"].bool()
        assert got.permute(0, 3, 1, 2)[padding].abs().max() == 0  # masked source padding gets nothing
    align = captured.alignment(0)  # the short source: its padding cut off
    length = len(tokenizer(SOURCES[0])["input_ids"])
    assert align.shape == (steps, length)
    mean = torch.stack([reference[n][0].mean(0) for n in reference]).mean(0)[:, :length]
    torch.testing.assert_close(align.double(), mean, atol=1e-5, rtol=0)
    assert len(captured.source_tokens(0)) == length


# -- the step clock ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("use_cache", [True, False])
def test_each_decoding_step_is_a_step(use_cache):
    model, tokenizer = tiny_t5("sdpa"), t5_tokenizer()
    batch = tokenizer(SOURCES, return_tensors="pt", padding=True)
    seen = []
    hook = xattn.Hook("probs", lambda p, ctx: seen.append((ctx.site.name, ctx.step, ctx.num_steps, tuple(p.shape),
                                                           ctx.layout.rows)), selector="kind=cross")
    with xattn.hooks(model, hook, tokenizer=tokenizer):
        out = model.generate(**batch, use_cache=use_cache, **GENERATE)
    steps = out.sequences.shape[1] - 1
    assert [step for _, step, _, _, _ in seen] == [s for s in range(steps) for _ in range(2)]
    assert {num for _, _, num, _, _ in seen} == {STEPS}
    queries = [shape[2] for _, _, _, shape, _ in seen]
    assert queries == ([1] * len(seen) if use_cache else [s + 1 for s in range(steps) for _ in range(2)])
    assert seen[0][4] == (xattn.Row(True, 0, 0), xattn.Row(True, 1, 0))


def test_beams_are_rows_and_the_alignment_follows_them():
    model, tokenizer = tiny_t5("sdpa"), t5_tokenizer()
    batch = tokenizer(SOURCES, return_tensors="pt", padding=True)
    capture = xattn.Capture(storage_dtype=torch.float32)
    layouts = []
    probe = xattn.Hook("value_scale", lambda x, ctx: layouts.append(ctx.layout) and None, selector="kind=cross")
    with xattn.hooks(model, capture, probe, tokenizer=tokenizer):
        out = model.generate(**batch, num_beams=2, num_return_sequences=2, max_new_tokens=STEPS,
                             return_dict_in_generate=True, output_scores=True)
    rows = layouts[0].rows
    assert [(r.prompt, r.image) for r in rows] == [(0, 0), (0, 1), (1, 0), (1, 1)]
    captured = seq2seq.maps(capture)
    for k in range(out.sequences.shape[0]):
        align = captured.alignment(beam_indices=out.beam_indices[k])
        assert align.shape[0] == int((out.beam_indices[k] >= 0).sum())
        torch.testing.assert_close(align.sum(-1), torch.ones(align.shape[0]), atol=1e-5, rtol=0)


# -- reweighting ---------------------------------------------------------------------------------------------------
def test_reweight_of_a_source_word_equals_scaling_its_columns_by_hand(setup):
    family, model, tokenizer, batch = setup
    ids = batch["input_ids"][0].tolist()
    red = [i for i, t in enumerate(tokenizer.convert_ids_to_tokens(ids)) if t.lstrip("\u2581") == "red"]
    assert len(red) == 1

    def by_hand(probs, ctx):
        probs = probs.clone()
        probs[0, :, :, red] *= 0.25
        return probs

    stock = model.generate(**batch, **GENERATE)
    with xattn.hooks(model, xattn.Reweight({"red": 0.25}, prompt_index=0), tokenizer=tokenizer):
        weighted = model.generate(**batch, **GENERATE)
    with xattn.hooks(model, xattn.Hook("probs", by_hand, selector="kind=cross")):
        reference = model.generate(**batch, **GENERATE)
    assert _max_score_diff(weighted, stock) > 1e-3  # it does something
    assert torch.equal(weighted.sequences, reference.sequences)
    assert _max_score_diff(weighted, reference) <= 1e-5


# -- restoring and refusing ----------------------------------------------------------------------------------------
def _state(model):
    modules = dict(model.named_modules())
    configs = {name: modules[name].config for name in (s.name for s in xattn.sites(model))}
    hooks = sum(len(m._forward_pre_hooks) + len(m._forward_hooks) for m in model.modules())
    return configs, hooks, "generate" in model.__dict__


def test_everything_is_put_back_after_the_session_and_after_an_exception():
    model, tokenizer = tiny_t5("sdpa"), t5_tokenizer()
    batch = tokenizer(SOURCES, return_tensors="pt", padding=True)
    before = _state(model)
    assert before[2] is False and all(c is model.decoder.config for c in before[0].values())
    stock = model.generate(**batch, **GENERATE)
    with xattn.hooks(model, xattn.Capture(), tokenizer=tokenizer):
        assert _state(model) != before
        model.generate(**batch, **GENERATE)
    assert _state(model) == before

    def boom(probs, ctx):
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        with xattn.hooks(model, xattn.Hook("probs", boom)):
            model.generate(**batch, **GENERATE)
    assert _state(model) == before
    again = model.generate(**batch, **GENERATE)
    assert torch.equal(again.sequences, stock.sequences) and _max_score_diff(again, stock) == 0.0
    assert model.config._attn_implementation == "sdpa"


def test_a_model_xattn_does_not_understand_is_refused_by_name():
    encoder_only = t5_encoder()
    with pytest.raises(seq2seq.UnsupportedSeq2SeqModelError, match="T5EncoderModel is not an encoder–decoder"):
        xattn.hooks(encoder_only, xattn.Capture())
    with pytest.raises(xattn.XattnError):
        xattn.sites(encoder_only)


def test_points_that_do_not_apply_and_other_implementations_are_refused():
    model = tiny_t5("sdpa")
    with pytest.raises(seq2seq.Seq2SeqError, match="context"):
        xattn.hooks(model, xattn.Reweight({0: 2.0}, mode="embedding"))
    model.set_attn_implementation("eager")
    model.decoder.block[0].layer[1].EncDecAttention.config._attn_implementation = "flex_attention"
    try:
        with pytest.raises(seq2seq.UnsupportedImplementationError, match="flex_attention"):
            with xattn.hooks(model, xattn.Capture()):
                pass
    finally:
        model.set_attn_implementation("eager")
    assert _state(model)[1] == 0 and "generate" not in model.__dict__


def test_a_capture_that_would_sum_target_positions_is_refused_not_changed():
    """per_step=False / keep_heads=False are the user's explicit choices: refused by name, never overridden."""
    model, tokenizer = tiny_t5("eager"), t5_tokenizer()
    for asked in ({"per_step": False}, {"keep_heads": False}):
        capture = xattn.Capture(**asked)
        with pytest.raises(seq2seq.Seq2SeqError, match="=False"):
            with xattn.hooks(model, capture, tokenizer=tokenizer):
                pass
        assert capture.asked == {"per_step": None, "keep_heads": None, **asked}
