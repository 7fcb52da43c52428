"""Single-file checkpoints: `--model model.safetensors` loaded offline with `from_single_file` and a config folder.

The checkpoint is the tiny SD 1.x pipeline written in the original LDM key layout (the converter below is
the inverse of diffusers' own LDM-to-diffusers conversion; the round trip is checked key by key).
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

import tiny_models

FAST = ["--steps", "2", "--size", "32", "--no-progress", "--seed", "3"]



def _resnet(prefix_from, prefix_to, sd, out, renames):
    for key, value in list(sd.items()):
        if key.startswith(prefix_from):
            rest = key[len(prefix_from):]
            for a, b in renames:
                if rest.startswith(a + "."):
                    rest = b + rest[len(a):]
                    break
            out[prefix_to + rest] = value


UNET_RESNET = [("norm1", "in_layers.0"), ("conv1", "in_layers.2"), ("norm2", "out_layers.0"),
               ("conv2", "out_layers.3"), ("time_emb_proj", "emb_layers.1"), ("conv_shortcut", "skip_connection")]


def unet_to_ldm(unet):
    sd, cfg, out = unet.state_dict(), unet.config, {}
    n, layers = len(cfg.block_out_channels), cfg.layers_per_block
    plain = {"time_embedding.linear_1": "time_embed.0", "time_embedding.linear_2": "time_embed.2",
             "conv_in": "input_blocks.0.0", "conv_norm_out": "out.0", "conv_out": "out.2"}
    moves = [(f"{a}.", f"{b}.", []) for a, b in plain.items()]
    for i in range(n):
        for j in range(layers):
            block = 1 + i * (layers + 1) + j
            moves.append((f"down_blocks.{i}.resnets.{j}.", f"input_blocks.{block}.0.", UNET_RESNET))
            moves.append((f"down_blocks.{i}.attentions.{j}.", f"input_blocks.{block}.1.", []))
        if i < n - 1:
            moves.append((f"down_blocks.{i}.downsamplers.0.conv.", f"input_blocks.{(i + 1) * (layers + 1)}.0.op.", []))
        up_attention = any(k.startswith(f"up_blocks.{i}.attentions.") for k in sd)
        for j in range(layers + 1):
            block = i * (layers + 1) + j
            moves.append((f"up_blocks.{i}.resnets.{j}.", f"output_blocks.{block}.0.", UNET_RESNET))
            moves.append((f"up_blocks.{i}.attentions.{j}.", f"output_blocks.{block}.1.", []))
        if i < n - 1:
            moves.append((f"up_blocks.{i}.upsamplers.0.", f"output_blocks.{i * (layers + 1) + layers}.{2 if up_attention else 1}.", []))
    moves += [("mid_block.resnets.0.", "middle_block.0.", UNET_RESNET), ("mid_block.attentions.0.", "middle_block.1.", []),
              ("mid_block.resnets.1.", "middle_block.2.", UNET_RESNET)]
    for a, b, renames in moves:
        _resnet(a, "model.diffusion_model." + b, sd, out, renames)
    assert len(out) == len(sd), set(sd) - {k for k in sd}  # every key moved once
    return out


VAE_RESNET = [("conv_shortcut", "nin_shortcut")]
VAE_ATTN = [("group_norm", "norm"), ("to_q", "q"), ("to_k", "k"), ("to_v", "v"), ("to_out.0", "proj_out")]


def vae_to_ldm(vae):
    sd, out = vae.state_dict(), {}
    n = len(vae.config.block_out_channels)
    moves = [("quant_conv.", "quant_conv.", []), ("post_quant_conv.", "post_quant_conv.", [])]
    for part in ("encoder", "decoder"):
        moves += [(f"{part}.conv_in.", f"{part}.conv_in.", []), (f"{part}.conv_out.", f"{part}.conv_out.", []),
                  (f"{part}.conv_norm_out.", f"{part}.norm_out.", []),
                  (f"{part}.mid_block.resnets.0.", f"{part}.mid.block_1.", VAE_RESNET),
                  (f"{part}.mid_block.resnets.1.", f"{part}.mid.block_2.", VAE_RESNET),
                  (f"{part}.mid_block.attentions.0.", f"{part}.mid.attn_1.", VAE_ATTN)]
    for i in range(n):
        for j in range(vae.config.layers_per_block + 1):
            moves.append((f"encoder.down_blocks.{i}.resnets.{j}.", f"encoder.down.{i}.block.{j}.", VAE_RESNET))
            moves.append((f"decoder.up_blocks.{i}.resnets.{j}.", f"decoder.up.{n - 1 - i}.block.{j}.", VAE_RESNET))
        moves.append((f"encoder.down_blocks.{i}.downsamplers.0.conv.", f"encoder.down.{i}.downsample.conv.", []))
        moves.append((f"decoder.up_blocks.{i}.upsamplers.0.conv.", f"decoder.up.{n - 1 - i}.upsample.conv.", []))
    for a, b, renames in moves:
        _resnet(a, "first_stage_model." + b, sd, out, renames)
    for key in list(out):  # LDM's VAE attention is 1x1 convolutions
        if ".mid.attn_1." in key and key.endswith(".weight") and out[key].ndim == 2:
            out[key] = out[key][:, :, None, None]
    assert len(out) == len(sd), sorted(set(sd))[:5]
    return out


def pipeline_to_ldm(pipe):
    state = {**unet_to_ldm(pipe.unet), **vae_to_ldm(pipe.vae)}
    for key, value in pipe.text_encoder.state_dict().items():
        state["cond_stage_model.transformer." + (key if key.startswith("text_model.") else "text_model." + key)] = value
    return {k: v.contiguous() for k, v in state.items()}


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory, sd1_path):
    pipe = tiny_models.load_sd(sd1_path)
    path = tmp_path_factory.mktemp("single") / "tiny-sd15.safetensors"
    save_file(pipeline_to_ldm(pipe), str(path))
    return path


def test_the_ldm_layout_round_trips_through_diffusers(checkpoint, sd1_path):
    from xattn.app.runner import load_pipeline

    single = load_pipeline(checkpoint, device="cpu", dtype="float32", config_folder=sd1_path)
    folder = tiny_models.load_sd(sd1_path)
    for name in ("unet", "vae", "text_encoder"):
        mine, theirs = getattr(single, name).state_dict(), getattr(folder, name).state_dict()
        assert mine.keys() == theirs.keys() and all(torch.equal(mine[k], theirs[k]) for k in mine), name
    assert single.xattn_identity["single_file"] and single.xattn_identity["config_folder"] == str(sd1_path)


def _pixels(path):
    with Image.open(path) as image:
        return np.asarray(image.convert("RGB"))


def test_generate_from_a_single_file_equals_the_pipeline_folder(cli, checkpoint, sd1_path, tmp_path):
    for out, flags in (("folder", ["--model", sd1_path]),
                       ("single", ["--model", checkpoint, "--config-folder", sd1_path])):
        result = cli("generate", "a red circle", *flags, *FAST, "--out", out)
        assert result.exit_code == 0, result.output
    assert np.array_equal(_pixels(tmp_path / "folder" / "image-0.png"), _pixels(tmp_path / "single" / "image-0.png"))
    model = json.loads((tmp_path / "single" / "manifest.json").read_text())["model"]
    assert model["single_file"] and model["path"] == str(checkpoint)
    assert model["pipeline_class"] == "StableDiffusionPipeline"
    result = cli("maps", "a red circle", "--model", checkpoint, "--config-folder", sd1_path, *FAST, "--out", "m")
    assert result.exit_code == 0, result.output


def test_without_a_config_folder_the_error_says_what_to_pass(cli, checkpoint, tmp_path, monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    result = cli("generate", "a red circle", "--model", checkpoint, *FAST)
    assert result.exit_code == 2 and "Traceback" not in result.output, result.output
    assert "pass --config-folder FOLDER" in result.output
    assert "hf download stable-diffusion-v1-5/stable-diffusion-v1-5 --include '*.json' '*.txt'" in result.output
    assert not (tmp_path / "outputs").exists()


@pytest.mark.parametrize("case", ["pickle", "bad config folder", "config folder for a folder model"])
def test_bad_single_file_input_exits_2(cli, checkpoint, sd1_path, tmp_path, case):
    if case == "pickle":
        (tmp_path / "model.ckpt").write_bytes(b"not read")
        args, message = ["--model", tmp_path / "model.ckpt"], "only as .safetensors"
    elif case == "bad config folder":
        args, message = ["--model", checkpoint, "--config-folder", tmp_path], "is not a diffusers pipeline folder"
    else:
        args, message = ["--model", sd1_path, "--config-folder", sd1_path], "--config-folder is for a single-file"
    result = cli("generate", "a red circle", *args, *FAST)
    assert result.exit_code == 2 and "Traceback" not in result.output, result.output
    assert message in result.output
