"""runner: loading by model reference, device/dtype/scheduler choice, reproducible generation."""

from __future__ import annotations

import json
import socket

import diffusers
import numpy as np
import pytest
import torch

from xattn import runner

SMALL = {"steps": 2, "guidance": 5.0, "size": 32}


@pytest.fixture(scope="module")
def sd1(sd1_path):
    return runner.load_pipeline(sd1_path, device="cpu")


def pixels(image) -> np.ndarray:
    return np.asarray(image.convert("RGB"))


def test_pipeline_class_follows_model_index(sd1_path, sdxl_path):
    assert type(runner.load_pipeline(sd1_path, device="cpu")) is diffusers.StableDiffusionPipeline
    assert type(runner.load_pipeline(sdxl_path, device="cpu")) is diffusers.StableDiffusionXLPipeline


def test_other_pipeline_classes_go_through_diffusion_pipeline(sd1_path, tmp_path, monkeypatch):
    index = json.loads((sd1_path / "model_index.json").read_text())
    calls = []
    original = diffusers.DiffusionPipeline.from_pretrained.__func__

    def spy(cls, path, **kwargs):
        calls.append(kwargs)
        return original(diffusers.StableDiffusionPipeline, path, **kwargs)

    monkeypatch.setattr(diffusers.DiffusionPipeline, "from_pretrained", classmethod(spy))
    copy = tmp_path / "renamed"
    import shutil

    shutil.copytree(sd1_path, copy)
    index["_class_name"] = "SomeOtherPipeline"
    (copy / "model_index.json").write_text(json.dumps(index))
    from xattn.app.loading import _pipeline_class

    assert _pipeline_class(copy) is diffusers.DiffusionPipeline
    runner.load_pipeline(copy, device="cpu")
    # safetensors only, no remote code, never a download
    assert calls and calls[0]["use_safetensors"] is True and calls[0]["trust_remote_code"] is False
    assert calls[0]["local_files_only"] is True


def test_missing_folder_is_named(tmp_path):
    missing = tmp_path / "no-such-model"
    with pytest.raises(runner.ModelNotFoundError, match="no-such-model"):
        runner.load_pipeline(str(missing))


def test_folder_without_model_index_is_rejected(tmp_path):
    with pytest.raises(runner.ModelNotFoundError, match="model_index.json"):
        runner.load_pipeline(str(tmp_path))


def test_uncached_hub_id_offline_fails_without_network(monkeypatch, tmp_path):
    import huggingface_hub.constants as hub_constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(hub_constants, "HF_HUB_CACHE", str(tmp_path / "empty-cache"))

    def no_network(*args, **kwargs):
        raise AssertionError("a network connection was attempted")

    monkeypatch.setattr(socket.socket, "connect", no_network)
    with pytest.raises(runner.ModelNotFoundError, match=r"someone/not-cached.*HF_HUB_OFFLINE"):
        runner.resolve_model("someone/not-cached")


def test_auto_device_and_dtype():
    device = runner.resolve_device("auto")
    expected = "cuda" if torch.cuda.is_available() else device.type
    assert device.type == expected
    assert runner.resolve_dtype("auto", torch.device("cuda")) == torch.float16
    assert runner.resolve_dtype("auto", torch.device("cpu")) == torch.float32
    assert runner.resolve_dtype("bfloat16", torch.device("cpu")) == torch.bfloat16


@pytest.mark.parametrize("bad", ["gpu", "tpu", "cuda-0"])
def test_bad_device_is_named(bad):
    with pytest.raises(runner.OptionError, match=bad):
        runner.resolve_device(bad)


def test_bad_dtype_is_named():
    with pytest.raises(runner.OptionError, match="float8"):
        runner.resolve_dtype("float8", torch.device("cpu"))


@pytest.mark.parametrize("name, cls, karras", [
    ("ddim", diffusers.DDIMScheduler, False),
    ("euler", diffusers.EulerDiscreteScheduler, False),
    ("euler-a", diffusers.EulerAncestralDiscreteScheduler, False),
    ("dpm++2m", diffusers.DPMSolverMultistepScheduler, False),
    ("dpm++2m-karras", diffusers.DPMSolverMultistepScheduler, True),
    ("heun", diffusers.HeunDiscreteScheduler, False),
    ("pndm", diffusers.PNDMScheduler, False),
])
def test_scheduler_names_map_to_diffusers_classes(sd1_path, name, cls, karras):
    pipe = runner.load_pipeline(sd1_path, device="cpu", scheduler=name)
    assert type(pipe.scheduler) is cls
    assert bool(getattr(pipe.scheduler.config, "use_karras_sigmas", False)) is karras
    # built from the model's own config, not from class defaults
    assert pipe.scheduler.config.beta_schedule == "scaled_linear"
    assert runner.scheduler_name(pipe.scheduler) == name


def test_unknown_scheduler_lists_choices(sd1_path):
    with pytest.raises(runner.OptionError, match=r"'dpm\+\+9'.*euler-a"):
        runner.load_pipeline(sd1_path, device="cpu", scheduler="dpm++9")


def test_a1111_sampler_names_round_trip():
    for name, spec in runner.SCHEDULERS.items():
        assert runner.scheduler_from_a1111(spec.a1111) == name
    with pytest.raises(runner.OptionError, match="Foo"):
        runner.scheduler_from_a1111("Foo")


@pytest.mark.parametrize("text, expected", [(64, (64, 64)), ("64", (64, 64)), ("512x768", (512, 768)),
                                            ("40X48", (40, 48)), ([32, 48], (32, 48))])
def test_parse_size(text, expected):
    assert runner.parse_size(text) == expected


@pytest.mark.parametrize("bad", ["abc", "64x", "60", "0", "64x64x64", "-64"])
def test_bad_size_is_named(bad):
    with pytest.raises(runner.OptionError, match="size"):
        runner.parse_size(bad)


def test_generate_matches_a_plain_diffusers_call(sd1):
    """Seed semantics against an independent call: one CPU generator seeded with the seed."""
    got = runner.generate(sd1, "a red circle", seed=7, **SMALL)[0]
    reference = sd1("a red circle", num_inference_steps=2, guidance_scale=5.0, width=32, height=32,
                    generator=torch.Generator("cpu").manual_seed(7)).images[0]
    assert np.array_equal(pixels(got), pixels(reference))


def test_each_image_has_its_own_seed(sd1):
    batch = runner.generate(sd1, ["a red circle", "a blue square"], seed=3, num_images_per_prompt=2, **SMALL)
    assert len(batch) == 4
    # image 3 (second image of the second prompt) is seed 3 + 3, alone
    alone = runner.generate(sd1, "a blue square", seed=6, **SMALL)[0]
    # Same latent and noise; a batch of 4 and a batch of 1 may round differently in the CPU's GEMMs
    # (blocking and memory alignment), so allow a level of rounding, not a different image.
    same = np.abs(pixels(batch[3]).astype(int) - pixels(alone).astype(int))
    assert same.max() <= 2, same.max()
    other = np.abs(pixels(batch[2]).astype(int) - pixels(batch[3]).astype(int))
    assert other.mean() > 10 * max(same.mean(), 0.1)  # image 2 (seed 5) is another image


def test_generate_is_bit_identical_on_cpu(sd1):
    first = runner.generate(sd1, "a red circle", seed=11, **SMALL)[0]
    second = runner.generate(sd1, "a red circle", seed=11, **SMALL)[0]
    assert np.array_equal(pixels(first), pixels(second))


def test_generate_rejects_empty_prompts_and_steps(sd1):
    with pytest.raises(runner.OptionError, match="prompt"):
        runner.generate(sd1, [], seed=0, **SMALL)
    with pytest.raises(runner.OptionError, match="steps"):
        runner.generate(sd1, "x", seed=0, steps=0, guidance=5.0)


def test_model_defaults(tmp_path):
    assert runner.model_defaults(tmp_path) == {}
    (tmp_path / "xattn_defaults.json").write_text(json.dumps({"steps": 25, "guidance": 5.0, "size": 64}))
    assert runner.model_defaults(tmp_path) == {"steps": 25, "guidance": 5.0, "size": 64}
    # the shapes-world exporter writes diffusers' argument names
    (tmp_path / "xattn_defaults.json").write_text(
        '{"guidance_scale": 4.0, "num_inference_steps": 25, "height": 64, "width": 96}')
    assert runner.model_defaults(tmp_path) == {"guidance": 4.0, "steps": 25, "size": "96x64"}
    (tmp_path / "xattn_defaults.json").write_text("[1, 2]")
    from xattn.app.modelfolder import ModelError

    with pytest.raises(ModelError, match="xattn_defaults.json must hold a JSON object"):
        runner.model_defaults(tmp_path)


def test_identity_records_hub_revision(tmp_path):
    snapshot = tmp_path / "models--a--b" / "snapshots" / ("0123456789abcdef" * 3)[:40]
    snapshot.mkdir(parents=True)
    (snapshot / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionPipeline"}))
    identity = runner.model_identity("a/b", snapshot)
    assert identity["revision"] == snapshot.name
    assert identity["pipeline_class"] == "StableDiffusionPipeline"


def test_hub_id_loads_from_the_local_cache_with_its_revision(sd1_path, tmp_path, monkeypatch):
    import shutil

    commit = "a" * 40
    repo = tmp_path / "hub" / "models--someone--tiny-sd"
    shutil.copytree(sd1_path, repo / "snapshots" / commit)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    import huggingface_hub.constants as hub_constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(hub_constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    pipe = runner.load_pipeline("someone/tiny-sd", device="cpu")
    assert pipe.xattn_identity["model"] == "someone/tiny-sd"
    assert pipe.xattn_identity["revision"] == commit
