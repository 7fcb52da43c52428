"""Selector: one syntax for Python, CLI and configs."""

from __future__ import annotations

import pytest

import xattn
from xattn import Selector, SelectorError
from xattn.sites import Site

CROSS_UP = Site("up_blocks.1.attentions.0.transformer_blocks.0.attn2", "cross", "up", 8, 40)
SELF_DOWN = Site("down_blocks.0.attentions.0.transformer_blocks.0.attn1", "self", "down", 8, 40)


def test_full_syntax_parses_every_field():
    s = Selector.parse('kind=cross res=16,<=8 steps=0:0.8,9 sites=up_blocks.* heads=0:2,5 tokens=cat,"red circle",5')
    assert s.kind == "cross"
    assert s.sites == ("up_blocks.*",)
    assert s.tokens == ("cat", "red circle", 5)
    assert s.matches_site(CROSS_UP) and not s.matches_site(SELF_DOWN)
    assert s.matches_res((16, 16)) and s.matches_res((4, 8)) and not s.matches_res((32, 32))
    assert [i for i in range(10) if s.matches_step(i, 10)] == [0, 1, 2, 3, 4, 5, 6, 7, 9]
    assert s.head_indices(8) == [0, 1, 5]


def test_round_trip_through_string_and_dict():
    s = Selector.parse("kind=self res=16x24 steps=2:10 heads=1")
    assert Selector.parse(str(s)) == s
    assert Selector.from_dict(s.to_dict()) == s


def test_semicolons_and_lists_in_configs():
    assert Selector.parse("kind=cross;res=16") == Selector.from_dict({"kind": "cross", "res": [16]})


def test_fraction_range_includes_last_step_at_one():
    s = Selector.parse("steps=0.5:1.0")
    assert [i for i in range(4) if s.matches_step(i, 4)] == [2, 3]


def test_open_ranges():
    s = Selector.parse("steps=3:")
    assert [i for i in range(6) if s.matches_step(i, 6)] == [3, 4, 5]
    assert Selector.parse("steps=:2").matches_step(1, 5) and not Selector.parse("steps=:2").matches_step(2, 5)


def test_empty_selector_selects_everything():
    s = Selector()
    assert s.matches_site(CROSS_UP) and s.matches_site(SELF_DOWN)
    assert s.matches_step(None, None) and s.head_indices(8) is None


def test_coerce_fills_only_unset_fields():
    s = Selector.coerce("res=16", kind="cross")
    assert s.kind == "cross" and s.matches_res((16, 16))
    assert Selector.coerce("kind=all", kind="cross").kind == "all"


@pytest.mark.parametrize(
    "text, fragment",
    [
        ("kind=diagonal", "kind must be one of"),
        ("colour=red", "unknown selector key 'colour'"),
        ("kind", "is not key=value"),
        ("res=abc", "not a positive size"),
        ("res=0", "not a positive size"),
        ("res=16xq", "HxW"),
        ("steps=0:1.5", "outside 0..1"),
        ("steps=5:2", "ends before it starts"),
        ("steps=1.5", "fraction of the schedule in 0..1"),
        ("steps=1:2:3", "more than one ':'"),
        ("steps=a:b", "is not a number"),
        ("heads=0.5:1", "integer indices"),
        ("res=16 res=8", "given twice"),
        ("res=", "empty value"),
        ("sites=a,,b", "empty item"),
        ('tokens="red', "cannot read selector"),
        ("steps=nan:1", "finite"),
    ],
)
def test_malformed_selectors_get_specific_errors(text, fragment):
    with pytest.raises(SelectorError, match=fragment.replace("(", r"\(").replace(".", r"\.")):
        Selector.parse(text)


def test_sites_table_names_and_kinds(sd1_pipe):
    site_list = xattn.sites(sd1_pipe)
    names = [s.name for s in site_list]
    modules = dict(sd1_pipe.unet.named_modules())
    assert len(names) == len(set(names)) == len(sd1_pipe.unet.attn_processors)
    for site in site_list:
        module = modules[site.name]
        assert site.kind == ("cross" if site.name.endswith("attn2") else "self")
        assert site.heads == module.heads
        assert site.heads * site.head_dim == module.to_q.out_features
        assert site.block == {"down_blocks": "down", "mid_block": "mid", "up_blocks": "up"}[site.name.split(".")[0]]
    assert "up_blocks.1.attentions.0.transformer_blocks.0.attn2" in names
