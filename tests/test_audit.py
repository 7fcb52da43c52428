"""The denoiser audit (xattn.audit, scripts/audit_denoisers.py, `xattn sites --audit`): no class crashes,
refusals are named errors that name the class, and single-stream blocks are joint sites."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

import xattn
from joint_reference import TEXT_DIM, flux_inputs, recording, reference
from xattn import audit
from xattn.cli import app
from xattn.install import hookable
from xattn.errors import UnsupportedAttentionError, UnsupportedModelError, XattnError

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
import audit_denoisers  # noqa: E402

# Classes whose sites raised a plain TypeError / AttributeError before (diffusers 0.42): each is now either
# listed (then refused by processor, with its site kinds) or refused by a named error.
LISTED = {  # class -> the site kinds its row reports
    "Ideogram4Transformer2DModel": "34 joint",  # num_heads + head_dim
    "JoyImageEditTransformer3DModel": "20 joint",  # img_attn_qkv / txt_attn_qkv: dual stream, no to_q
    "JoyImageEditPlusTransformer3DModel": "20 joint",
    "Krea2Transformer2DModel": "28 joint, 4 self",  # text-fusion blocks see text only
    "PRXTransformer2DModel": "16 joint",  # image queries over image and text keys
}
NO_REGISTRY = ("AllegroTransformer3DModel", "CogView4Transformer2DModel", "DiTTransformer2DModel",
               "Lumina2Transformer2DModel", "UNet1DModel", "UNet2DModel", "ZImageTransformer2DModel")
UNREADABLE = ("Kandinsky5Transformer3DModel", "Kandinsky6Transformer3DModel", "Kandinsky6SRTransformer3DModel")


@pytest.fixture(scope="module")
def rows():
    return audit.audit_all()


def test_known_classes_get_their_status():
    names = audit.denoiser_classes()
    assert {"UNet2DConditionModel", "SD3Transformer2DModel", "FluxTransformer2DModel"} <= set(names)
    assert all(name.endswith("Model") and ("Transformer" in name or name.startswith("UNet")) for name in names)
    assert audit.audit("SD3Transformer2DModel")[0] == "hooked, tested"
    assert audit.audit("FluxTransformer2DModel") == (
        "hooked, tested", "test_joint.py, test_joint_maps.py, test_flux_pipeline.py; sites: 57 joint")
    status, detail = audit.audit("WanTransformer3DModel")
    assert status == "refused" and "WanAttnProcessor" in detail
    assert audit.audit("Transformer2DModel")[0] == "not instantiated"  # no default input kind
    status, detail = audit.audit("UNet1DModel")
    assert status == "refused"
    assert detail.startswith("UnsupportedModelError: diffusers.models.unets.unet_1d.UNet1DModel has no")
    assert audit_denoisers.audit is audit.audit  # the script runs the library's audit


def test_no_class_crashes(rows):
    assert [name for name, _, _ in rows] == audit.denoiser_classes()
    crashes = [(name, detail) for name, status, detail in rows if status == "crashes"]
    assert not crashes
    assert {status for _, status, _ in rows} <= set(audit.STATUSES)
    by_name = {name: (status, detail) for name, status, detail in rows}
    for name, kinds in LISTED.items():
        status, detail = by_name[name]
        assert status == "refused" and "(UnsupportedProcessorError)" in detail and detail.endswith(f"sites: {kinds}"), \
            (name, detail)
    for name in NO_REGISTRY:
        assert by_name[name][1].startswith("UnsupportedModelError: diffusers.models."), name
        assert f".{name} has no `attn_processors`" in by_name[name][1]
    for name in UNREADABLE:
        assert by_name[name][1].startswith("UnsupportedAttentionError: site "), name
    assert audit.summary(rows).startswith(f"{len(rows)} classes: ") and "crashes" not in audit.summary(rows)


def test_a_model_without_a_processor_registry_is_refused_by_name():
    model = audit.build("UNet2DModel")
    with pytest.raises(UnsupportedModelError, match=r"diffusers\.models\.unets\.unet_2d\.UNet2DModel has no "
                                                    r"`attn_processors`") as caught:
        xattn.sites(model)
    assert isinstance(caught.value, XattnError)
    assert isinstance(caught.value, TypeError)  # code that caught the former TypeError still does
    with pytest.raises(UnsupportedModelError, match="UNet2DModel"):
        hookable(model)


def test_an_attention_module_xattn_cannot_read_is_refused_by_name():
    model = audit.build("Kandinsky5Transformer3DModel")
    with pytest.raises(UnsupportedAttentionError) as caught:
        xattn.sites(model)
    message = str(caught.value)
    assert "site text_transformer_blocks.0.self_attention of " in message  # the module path
    assert "transformer_kandinsky.Kandinsky5Transformer3DModel" in message  # the model
    assert "transformer_kandinsky.Kandinsky5Attention" in message  # the attention class
    assert "no head size" in message and "no head count" not in message  # what xattn does not understand


def test_fused_qkv_modules_read_heads_and_head_size():
    sites = xattn.sites(audit.build("Flux2Transformer2DModel"))
    single = [site for site in sites if site.name.startswith("single_transformer_blocks.")]
    assert len(single) == 48 and {(s.kind, s.heads, s.head_dim) for s in single} == {("joint", 48, 128)}
    krea = {site.name: site for site in xattn.sites(audit.build("Krea2Transformer2DModel"))}
    joint, text = krea["transformer_blocks.0.attn"], krea["text_fusion.layerwise_blocks.0.attn"]
    assert (joint.kind, joint.heads, joint.head_dim) == ("joint", 48, 128)  # num_heads, to_q width / heads
    assert (text.kind, text.heads, text.head_dim) == ("self", 20, 128)  # text-fusion blocks see text only


def chroma_model():
    from diffusers import ChromaTransformer2DModel

    torch.manual_seed(1)
    return ChromaTransformer2DModel(
        patch_size=1, in_channels=8, num_layers=1, num_single_layers=1, attention_head_dim=8, num_attention_heads=2,
        joint_attention_dim=TEXT_DIM, axes_dims_rope=(2, 2, 4), approximator_num_channels=8,
        approximator_hidden_dim=16, approximator_layers=1,
    ).eval()


def test_chroma_single_stream_sites_are_joint_and_hooked_as_flux():
    assert {site.kind for site in xattn.sites(audit.build("ChromaTransformer2DModel"))} == {"joint"}  # 57 sites
    model = chroma_model()
    assert [(s.name, s.kind) for s in xattn.sites(model)] == [
        ("transformer_blocks.0.attn", "joint"), ("single_transformer_blocks.0.attn", "joint")]
    kwargs = flux_inputs(seed=1)  # a 3 x 5 token grid, 7 text tokens
    del kwargs["pooled_projections"]
    with torch.no_grad():
        expected = model(**kwargs).sample
    seen = {}

    def keep(probs, ctx):
        seen[ctx.site.name] = (probs.clone(), ctx.res)

    name = "single_transformer_blocks.0.attn"
    with recording(model, [name]) as records, torch.no_grad(), xattn.hooks(
            model, xattn.Hook("probs", keep, "kind=all"), layout=xattn.BatchLayout.plain(2)):
        got = model(**kwargs).sample
    assert (got - expected).abs().max() <= 1e-5  # the explicit map changes nothing
    probs, res = seen[name]
    assert probs.shape == (2, 2, 15, 7) and res == (3, 5)  # image queries x text keys, not the whole sequence
    modules = dict(model.named_modules())
    reference_probs = reference(modules[name], records[name], family="flux", text_first=True, image_tokens=15)["probs"]
    assert (probs.double() - reference_probs).abs().max() <= 1e-5


def test_cli_sites_audit_prints_the_table(rows):
    result = CliRunner().invoke(app, ["sites", "--audit"])
    assert result.exit_code == 0, result.output
    assert result.output.strip() == audit.report(rows)
    assert "| `FluxTransformer2DModel` | hooked, tested |" in result.output


@pytest.mark.parametrize("extra, named", [(["--kind", "cross"], "--kind"), (["some/model"], "MODEL"),
                                          (["--model", "some/model"], "--model")])
def test_cli_sites_audit_refuses_a_model_or_kind(extra, named):
    result = CliRunner().invoke(app, ["sites", "--audit", *extra])
    assert result.exit_code == 2, result.output
    assert "Error: --audit" in result.output and f"drop {named}" in result.output


def test_script_writes_the_coverage_page(rows, tmp_path, monkeypatch):
    monkeypatch.setattr(audit_denoisers, "audit_all", lambda: rows)
    target = tmp_path / "coverage.md"
    monkeypatch.setattr(sys, "argv", ["audit_denoisers.py", "--write", str(target)])
    audit_denoisers.main()
    text = target.read_text()
    assert text.startswith("# Denoiser coverage\n")
    assert f"python scripts/audit_denoisers.py --write {target}" in text
    assert f"{audit.summary(rows)}.\n\n{audit.table(rows)}\n" in text
