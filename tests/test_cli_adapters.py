"""`--controlnet` and `--ip-adapter` on generate, maps and reweight: local safetensors folders, offline.

A tiny ControlNet (``ControlNetModel.from_unet`` of the tiny SD 1.x / SDXL UNets, saved with
``save_pretrained``) and a tiny IP-Adapter folder in the layout ``load_ip_adapter`` reads
(``ip-adapter.safetensors`` with ``image_proj.*`` / ``ip_adapter.*`` keys, ``image_encoder/``).
"""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
import torch
from diffusers import ControlNetModel
from PIL import Image
from safetensors.torch import save_file

import tiny_models

FAST = ["--steps", "2", "--size", "32", "--no-progress", "--seed", "3"]


def _controlnet(unet, folder):
    net = ControlNetModel.from_unet(unet, conditioning_embedding_out_channels=(8, 16))
    torch.manual_seed(1)
    with torch.no_grad():  # from_unet zero-initialises the output convolutions: give them weight
        for module in [*net.controlnet_down_blocks, net.controlnet_mid_block]:
            module.weight.normal_(0, 0.1)
    net.save_pretrained(folder, safe_serialization=True)
    return folder


@pytest.fixture(scope="module")
def controlnet_path(tmp_path_factory, sd1_path):
    return _controlnet(tiny_models.load_sd(sd1_path).unet, tmp_path_factory.mktemp("controlnet"))


@pytest.fixture(scope="module")
def ip_adapter_path(tmp_path_factory, sd1_path):
    folder = tmp_path_factory.mktemp("ip_adapter")
    unet = tiny_models.load_sd(sd1_path).unet
    state = tiny_models.ip_adapter_state_dict(unet)
    flat = {f"{part}.{key}": value.contiguous() for part, values in state.items() for key, value in values.items()}
    save_file(flat, str(folder / "ip-adapter.safetensors"))
    torch.manual_seed(0)
    encoder, _ = tiny_models.image_encoder()
    encoder.save_pretrained(folder / "image_encoder", safe_serialization=True)
    return folder


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    folder = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(0)
    for name, size in (("control.png", 32), ("control-b.png", 32), ("big.png", 48), ("face.png", 40)):
        Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(folder / name)
    (folder / "not-an-image.png").write_text("hello")
    return folder


def _pixels(path):
    with Image.open(path) as image:
        return np.asarray(image.convert("RGB")).astype(int)


def _manifest(folder):
    return json.loads((folder / "manifest.json").read_text())


def _run(cli, *args):
    result = cli(*args)
    assert result.exit_code == 0, result.output
    return result


# -- ControlNet -------------------------------------------------------------------------------------

def test_generate_with_a_controlnet_switches_the_pipeline_and_records_it(cli, sd1_path, controlnet_path, images,
                                                                         tmp_path):
    _run(cli, "generate", "a red circle", "--model", sd1_path, *FAST, "--out", "plain")
    _run(cli, "generate", "a red circle", "--model", sd1_path, *FAST, "--out", "cn",
         "--controlnet", controlnet_path, "--control-image", images / "control.png")
    _run(cli, "generate", "a red circle", "--model", sd1_path, *FAST, "--out", "off",
         "--controlnet", controlnet_path, "--control-image", images / "control.png", "--control-scale", "0")
    manifest = _manifest(tmp_path / "cn")
    assert manifest["model"]["pipeline"] == "StableDiffusionControlNetPipeline"
    assert manifest["model"]["controlnet"]["folders"] == [str(controlnet_path)]
    assert manifest["model"]["controlnet"]["images"] == [str(images / "control.png")]
    assert manifest["settings"]["controlnet"] == str(controlnet_path)
    plain, controlled, off = (_pixels(tmp_path / name / "image-0.png") for name in ("plain", "cn", "off"))
    assert np.abs(controlled - plain).max() > 3  # the ControlNet steers the image
    assert np.abs(off - plain).max() <= 1  # at scale 0 its residuals add nothing: the plain image


def test_several_controlnets_and_scales(cli, sd1_path, controlnet_path, images, tmp_path):
    _run(cli, "generate", "a red circle", "--model", sd1_path, *FAST, "--out", "two",
         "--controlnet", f"{controlnet_path},{controlnet_path}",
         "--control-image", f"{images / 'control.png'},{images / 'control-b.png'}", "--control-scale", "0.5,1")
    record = _manifest(tmp_path / "two")["model"]["controlnet"]
    assert len(record["folders"]) == 2 and record["scales"] == [0.5, 1.0]


def test_maps_and_reweight_take_a_controlnet(cli, sd1_path, controlnet_path, images, tmp_path):
    flags = ["--controlnet", controlnet_path, "--control-image", images / "control.png"]
    _run(cli, "maps", "a red circle", "--model", sd1_path, *FAST, "--out", "maps", *flags)
    manifest = _manifest(tmp_path / "maps")
    assert manifest["model"]["pipeline"] == "StableDiffusionControlNetPipeline" and manifest["maps"]
    _run(cli, "reweight", "a red circle", "--word", "red", "--weights", "0,2", "--model", sd1_path, *FAST,
         "--out", "rw", *flags)
    assert _manifest(tmp_path / "rw")["model"]["controlnet"]["folders"] == [str(controlnet_path)]


def test_sdxl_switches_to_its_controlnet_pipeline(cli, sdxl_path, images, tmp_path):
    net = _controlnet(tiny_models.load_sdxl(sdxl_path).unet, tmp_path / "xl-controlnet")
    _run(cli, "generate", "a red circle", "--model", sdxl_path, *FAST, "--out", "xl",
         "--controlnet", net, "--control-image", images / "control.png")
    assert _manifest(tmp_path / "xl")["model"]["pipeline"] == "StableDiffusionXLControlNetPipeline"


# -- IP-Adapter ---------------------------------------------------------------------------------------

def test_ip_adapter_on_generate_maps_and_reweight(cli, sd1_path, ip_adapter_path, images, tmp_path):
    _run(cli, "generate", "a red circle", "--model", sd1_path, *FAST, "--out", "plain")
    flags = ["--ip-adapter", ip_adapter_path, "--ip-image", images / "face.png"]
    _run(cli, "generate", "a red circle", "--model", sd1_path, *FAST, "--out", "ip", *flags)
    _run(cli, "generate", "a red circle", "--model", sd1_path, *FAST, "--out", "zero", *flags, "--ip-scale", "0")
    record = _manifest(tmp_path / "ip")["model"]["ip_adapter"]
    assert record["folder"] == str(ip_adapter_path) and record["weights"] == "ip-adapter.safetensors"
    assert _manifest(tmp_path / "zero")["model"]["ip_adapter"]["scale"] == 0.0
    plain, ip, zero = (_pixels(tmp_path / name / "image-0.png") for name in ("plain", "ip", "zero"))
    assert np.abs(ip - plain).max() > 3
    assert np.abs(zero - plain).max() <= 1  # scale 0: diffusers skips the image branch
    _run(cli, "maps", "a red circle", "--model", sd1_path, *FAST, "--out", "maps", *flags)
    _run(cli, "reweight", "a (red:2) circle", "--model", sd1_path, *FAST, "--out", "rw",
         "--ip-adapter", ip_adapter_path / "ip-adapter.safetensors", "--ip-image", images / "face.png")
    assert _manifest(tmp_path / "rw")["model"]["ip_adapter"]["weights"] == "ip-adapter.safetensors"


def test_controlnet_and_ip_adapter_together(cli, sd1_path, controlnet_path, ip_adapter_path, images, tmp_path):
    _run(cli, "generate", "a red circle", "--model", sd1_path, *FAST, "--out", "both",
         "--controlnet", controlnet_path, "--control-image", images / "control.png",
         "--ip-adapter", ip_adapter_path, "--ip-image", images / "face.png", "--ip-scale", "0.5")
    model = _manifest(tmp_path / "both")["model"]
    assert model["pipeline"] == "StableDiffusionControlNetPipeline" and model["ip_adapter"]["scale"] == 0.5


# -- bad input: exit 2, one Error: line, nothing written -------------------------------------------------

BAD = {
    "missing controlnet": (["--controlnet", "{tmp}/nope", "--control-image", "{img}/control.png"],
                           "ControlNet folder .* does not exist"),
    "size mismatch": (["--controlnet", "{cn}", "--control-image", "{img}/big.png"],
                      r"control image .*big.png is 48x48 but the run makes 32x32 images; pass --size 48x48"),
    "more images than nets": (["--controlnet", "{cn}", "--control-image", "{img}/control.png,{img}/control-b.png"],
                              r"2 control image\(s\) for 1 ControlNet\(s\): more images than nets"),
    "no control image": (["--controlnet", "{cn}"], "--controlnet needs --control-image"),
    "image without net": (["--control-image", "{img}/control.png"], "--control-image and --control-scale need"),
    "nan scale": (["--controlnet", "{cn}", "--control-image", "{img}/control.png", "--control-scale", "nan"],
                  "--control-scale 'nan': 'nan' is not a finite number"),
    "inf scale": (["--controlnet", "{cn}", "--control-image", "{img}/control.png", "--control-scale", "1,inf"],
                  "is not a finite number"),
    "unreadable image": (["--controlnet", "{cn}", "--control-image", "{img}/not-an-image.png"],
                         "is not an image xattn can read"),
    "missing ip adapter": (["--ip-adapter", "{tmp}/nope", "--ip-image", "{img}/face.png"],
                           "IP-Adapter .* does not exist"),
    "ip without image": (["--ip-adapter", "{ip}"], "--ip-adapter needs --ip-image"),
    "nan ip scale": (["--ip-adapter", "{ip}", "--ip-image", "{img}/face.png", "--ip-scale", "nan"],
                     "--ip-scale .* is not a finite number"),
    "controlnet is not a folder": (["--controlnet", "{img}", "--control-image", "{img}/control.png"],
                                   "no config.json"),
}


# Every case on generate; the three commands share the checks, so maps and reweight get three each.
CASES = [("generate", case) for case in BAD] + [
    (command, case) for command in ("maps", "reweight") for case in ("size mismatch", "nan scale", "missing ip adapter")]


@pytest.mark.parametrize("command, case", CASES)
def test_bad_adapter_input_exits_2_with_one_error_line(cli, sd1_path, controlnet_path, ip_adapter_path, images,
                                                       tmp_path, case, command):
    flags, message = BAD[case]
    values = {"tmp": tmp_path, "img": images, "cn": controlnet_path, "ip": ip_adapter_path}
    flags = [flag.format(**values) for flag in flags]
    result = cli(command, "a red circle", "--model", sd1_path, *FAST, *flags)
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    error = [line for line in result.output.splitlines() if line.startswith("Error:")]
    assert len(error) == 1 and re.search(message, error[0]), result.output
    assert not (tmp_path / "outputs").exists()


def test_ip_adapter_on_a_model_without_a_unet_and_controlnet_on_sd3_are_refused(cli, images, ip_adapter_path,
                                                                                controlnet_path, tmp_path):
    from joint_reference import sd3_pipeline

    sd3_pipeline(tmp_path / "sd3")
    for flags, message in (
        (["--ip-adapter", ip_adapter_path, "--ip-image", images / "face.png"],
         "--ip-adapter needs a UNet pipeline .* StableDiffusion3Pipeline has a SD3Transformer2DModel"),
        (["--controlnet", controlnet_path, "--control-image", images / "control.png"],
         "--controlnet needs an SD 1.x / 2.x or SDXL pipeline; StableDiffusion3Pipeline"),
    ):
        result = cli("generate", "a red circle", "--model", tmp_path / "sd3", "--steps", "1", "--size", "16",
                     "--no-progress", *flags)
        assert result.exit_code == 2 and "Traceback" not in result.output, result.output
        assert re.search(message, result.output), result.output
    assert not (tmp_path / "outputs").exists()


def test_an_ip_adapter_for_another_base_model_is_refused(cli, sd1_path, sdxl_path, images, tmp_path):
    folder = tmp_path / "xl-ip"
    folder.mkdir()
    state = tiny_models.ip_adapter_state_dict(tiny_models.load_sdxl(sdxl_path).unet)
    save_file({f"{p}.{k}": v.contiguous() for p, vs in state.items() for k, v in vs.items()},
              str(folder / "ip.safetensors"))
    encoder, _ = tiny_models.image_encoder()
    encoder.save_pretrained(folder / "image_encoder", safe_serialization=True)
    result = cli("generate", "a red circle", "--model", sd1_path, *FAST, "--ip-adapter", folder,
                 "--ip-image", images / "face.png")
    assert result.exit_code == 2 and "Traceback" not in result.output, result.output
    assert "could not load the IP-Adapter" in result.output
