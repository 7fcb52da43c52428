"""Every user mistake: exit code 2, one ``Error:`` line naming the problem, no traceback, no file changed.

Each row is a command line and a fragment the message must hold. The tiny
random pipeline stands in for a real model wherever its pictures do not
matter. The tree under the test's working directory is hashed before and
after each command: a refused command writes nothing and touches nothing.
"""

from __future__ import annotations

import errno
import hashlib
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image
from PIL.PngImagePlugin import PngInfo
from typer.testing import CliRunner

from xattn.cli import app

FAST = ["--steps", "2", "--size", "32", "--no-progress"]
GOOD_LINE = "Steps: 2, Sampler: DDIM, CFG scale: 5.0, Seed: 3, Size: 32x32"


def snapshot(root: Path) -> dict[str, str]:
    """Every file and folder under ``root``: content digest and mode."""
    state = {}
    for path in sorted(root.rglob("*")):
        key = str(path.relative_to(root))
        if path.is_dir():
            state[key] = f"dir {path.stat().st_mode:o}"
        else:
            state[key] = f"{hashlib.sha256(path.read_bytes()).hexdigest()} {path.stat().st_mode:o}"
    return state


def png_with(path: Path, text: str) -> Path:
    info = PngInfo()
    info.add_text("parameters", text)
    Image.new("RGB", (32, 32), "white").save(path, pnginfo=info)
    return path


def model_folder(path: Path, index: dict | str, files: dict[str, str] | None = None) -> Path:
    path.mkdir()
    (path / "model_index.json").write_text(index if isinstance(index, str) else json.dumps(index))
    for name, content in (files or {}).items():
        (path / name).parent.mkdir(parents=True, exist_ok=True)
        (path / name).write_text(content)
    return path


@pytest.fixture
def place(tmp_path, monkeypatch, sd1_path):
    """A working directory holding every bad input the table names."""
    monkeypatch.chdir(tmp_path)
    png_with(tmp_path / "odd-json.png", f'a red circle\n{GOOD_LINE}, xattn: "[1, 2]"')
    png_with(tmp_path / "bad-seed.png", "a red circle\nSteps: 2, Sampler: DDIM, CFG scale: 5.0, Seed: -5, Size: 32x32")
    png_with(tmp_path / "nan-cfg.png", "a red circle\nSteps: 2, Sampler: DDIM, CFG scale: nan, Seed: 3, Size: 32x32")
    png_with(tmp_path / "huge.png", "a red circle\nSteps: 2, Sampler: DDIM, CFG scale: 5, Seed: 3, Size: 100000x100000")
    png_with(tmp_path / "odd-reweight.png", f'a red circle\n{GOOD_LINE}, xattn: "{{\\"reweight\\": [1]}}"')
    (tmp_path / "not-a.png").write_text("hello")
    whole = png_with(tmp_path / "whole.png", f"a red circle\n{GOOD_LINE}").read_bytes()
    (tmp_path / "truncated.png").write_bytes(whole[: len(whole) // 2])
    (tmp_path / "whole.png").unlink()
    index = json.loads((sd1_path / "model_index.json").read_text())
    model_folder(tmp_path / "bin-only", index, {"unet/diffusion_pytorch_model.bin": "pickle", "unet/config.json": "{}"})
    model_folder(tmp_path / "ddpm", {"_class_name": "DDPMPipeline", "unet": ["diffusers", "UNet2DModel"],
                                     "scheduler": ["diffusers", "DDPMScheduler"]})
    model_folder(tmp_path / "custom", {**index, "unet": ["my_unet", "MyUNet"]})
    model_folder(tmp_path / "malformed", "{not json")
    (tmp_path / "a-file").write_text("not a folder")
    finished = tmp_path / "finished"
    finished.mkdir()
    (finished / "manifest.json").write_text(json.dumps({"status": "finished", "outputs": []}))
    (tmp_path / "nan-weights.yaml").write_text(
        "job: reweight\ngrid:\n  prompts: [a red circle]\n  seeds: [0]\n  words: [red]\n  weights: [.nan]\n")
    (tmp_path / "big-seed.yaml").write_text("grid:\n  prompts: [a red circle]\n  seeds: [18446744073709551616]\n")
    (tmp_path / "prompt.yaml").write_text("prompt: a red circle\n")
    (tmp_path / "generate-sites.yaml").write_text(
        "job: generate\nsites: kind=cross\ngrid:\n  prompts: [a red circle]\n  seeds: [0]\n")
    shutil.copytree(sd1_path, tmp_path / "bad-defaults")
    (tmp_path / "bad-defaults" / "xattn_defaults.json").write_text("{cut")
    (tmp_path / "inf-guidance.yaml").write_text("guidance: .inf\n")
    (tmp_path / "syntax.yaml").write_text("syntax: nai\n")
    (tmp_path / "refine-outside.yaml").write_text(
        'steps: 2\nguide: {excite: circle, steps: "0:1", refine: {1: 0.5}}\ngrid:\n  prompts: [a red circle]\n'
        "  seeds: [0]\n")
    return tmp_path


M = "{model}"  # replaced by the tiny model's folder
CASES = {
    "size too large": (["generate", "x", "-m", M, "--size", "100000"], "--max-pixels"),
    "size non-ASCII digit": (["generate", "x", "-m", M, "--size", "²"], "digits 0-9"),
    "size zero": (["generate", "x", "-m", M, "--size", "0"], "positive multiples of 8"),
    "size not multiple of 8": (["generate", "x", "-m", M, "--size", "30"], "multiples of 8"),
    "guidance nan": (["generate", "x", "-m", M, "--guidance", "nan"], "finite"),
    "guidance inf": (["generate", "x", "-m", M, "--guidance", "inf"], "finite"),
    "guidance 1e300": (["generate", "x", "-m", M, "--guidance", "1e300"], "float32"),
    "guidance 1e39": (["generate", "x", "-m", M, "--guidance", "1e39"], "float32"),
    "seed 2**64": (["generate", "x", "-m", M, "--seed", str(2**64)], "seed must be between 0 and"),
    "last seed past 2**64": (["generate", "x", "-m", M, "--seed", str(2**64 - 1), "--images", "2"], "last image's seed"),
    "seed negative": (["generate", "x", "-m", M, "--seed", "-1"], "seed must be between 0 and"),
    "steps zero": (["generate", "x", "-m", M, "--steps", "0"], "steps must be between 1"),
    "threads zero": (["generate", "x", "-m", M, "--threads", "0"], "threads must be between 1"),
    "max-pixels tiny": (["generate", "x", "-m", M, "--max-pixels", "10"], "max_pixels must be >= 64"),
    "prompt with NUL": (["generate", "a red\0circle", "-m", M], "NUL"),
    "reweight 1e39": (["reweight", "a red circle", "-m", M, "--word", "red", "--weights=1e39"], "float32"),
    "reweight nan": (["reweight", "a red circle", "-m", M, "--word", "red", "--weights=0,nan"], "finite"),
    "reweight heads= it ignores": (["reweight", "a red circle", "-m", M, "--word", "red", "--weights=2",
                                   "--select", "heads=99"], "does not honour heads="),
    "reweight selector matches nothing": (["reweight", "a red circle", "-m", M, "--word", "red", "--weights=2",
                                           "--select", "sites=nowhere.*"], "matches no attention site"),
    "generate box outside the image": (["generate", "a red circle", "-m", M, "--box", "red circle=0,0,2,1"],
                                       "fractions in 0..1"),
    "generate guide step size nan": (["generate", "a red circle", "-m", M, "--excite", "circle",
                                      "--guide-step-size", "nan"], "step_size must be a finite number"),
    "generate guide step size inf": (["generate", "a red circle", "-m", M, "--excite", "circle",
                                      "--guide-step-size", "inf"], "step_size must be a finite number"),
    "generate guide window past the run": (["generate", "a red circle", "-m", M, *FAST, "--excite", "circle",
                                            "--guide-steps", "5:9"], "holds no step of this 2-step run"),
    "generate syntax unknown": (["generate", "a red circle", "-m", M, "--syntax", "nai"], "'nai' is not one of"),
    "config syntax unknown": (["generate", "a red circle", "-m", M, "-c", "syntax.yaml"], "syntax must be one of"),
    "reweight seeds too many": (["reweight", "a red circle", "-m", M, "--seeds", "0:9999999999"], "at most"),
    "reweight seeds past 2**64": (["reweight", "a red circle", "-m", M, "--seeds", f"{2**64}:{2**64 + 1}"], "seeds"),
    "edit reweight nan": (["edit", "--source", "a red circle", "--target", "a green circle", "-m", M,
                           "--reweight", "green=nan"], "finite"),
    "edit threshold nan": (["edit", "--source", "a red circle", "--target", "a green circle", "-m", M,
                            "--threshold", "nan"], "finite"),
    "maps res 99": (["maps", "a red circle", "-m", M, "--res", "99"], "no attention map matches"),
    "maps site nowhere": (["maps", "a red circle", "-m", M, "--site", "nowhere.*"], "no cross-attention site"),
    "maps empty prompt": (["maps", "", "-m", M], "no words"),
    "maps unknown word": (["maps", "a red <|endoftext|> circle", "-m", M, "-t", "blue"], "'blue' is not in the prompt"),
    "model .bin only": (["generate", "x", "-m", "bin-only"], "pickle"),
    "model DDPM": (["generate", "x", "-m", "ddpm"], "not a text-to-image pipeline"),
    "model custom code": (["generate", "x", "-m", "custom"], "never runs a model's own code"),
    "model malformed JSON": (["generate", "x", "-m", "malformed"], "cannot be read as JSON"),
    "out under a file": (["generate", "x", "-m", M, "--out", "a-file/run"], "is a file"),
    "out finished": (["generate", "x", "-m", M, "--out", "finished"], "finished run"),
    "device mps": (["generate", "x", "-m", M, "--device", "mps"], "MPS"),
    "from-png not a PNG": (["generate", "--from-png", "not-a.png", "-m", M], "cannot be read as a PNG"),
    "from-png truncated": (["generate", "--from-png", "truncated.png", "-m", M], "truncated.png"),
    "from-png odd JSON": (["generate", "--from-png", "odd-json.png", "-m", M], "JSON object"),
    "from-png odd reweight": (["generate", "--from-png", "odd-reweight.png", "-m", M], "reweight"),
    "from-png seed -5": (["generate", "--from-png", "bad-seed.png", "-m", M], "bad-seed.png: seed"),
    "from-png CFG nan": (["generate", "--from-png", "nan-cfg.png", "-m", M], "nan-cfg.png: guidance"),
    "from-png huge size": (["generate", "--from-png", "huge.png", "-m", M], "--max-pixels"),
    "config prompt key": (["generate", "x", "-m", M, "-c", "prompt.yaml"], "unknown key 'prompt'"),
    "config inf guidance": (["generate", "x", "-m", M, "-c", "inf-guidance.yaml"], "key 'guidance'"),
    "sweep nan weights": (["sweep", "nan-weights.yaml", "-m", M], "grid.weights"),
    "sweep seed 2**64": (["sweep", "big-seed.yaml", "-m", M], "grid.seeds"),
    "sweep refine outside its window": (["sweep", "refine-outside.yaml", "-m", M], "refine steps [1] lie outside"),
    "sweep generate with sites": (["sweep", "generate-sites.yaml", "-m", M], "no meaning for job: generate"),
    "model defaults malformed": (["generate", "x", "-m", "bad-defaults"], "xattn_defaults.json cannot be read"),
    "report not a run": (["report", "a-file"], "not a folder"),
    # an option given empty (a script's unset variable) is refused, never read as its default or as '.'
    "out empty": (["generate", "x", "-m", M, "--out", ""], "'--out': is empty"),
    "config empty": (["generate", "x", "-m", M, "-c", ""], "is empty"),
    "lora-dir empty": (["generate", "x", "-m", M, "--lora-dir", ""], "'--lora-dir': is empty"),
    "from-png empty": (["generate", "--from-png", "", "-m", M], "'--from-png': is empty"),
    "generate excite empty": (["generate", "a red circle", "-m", M, "--excite", ""], "Excite needs one or more words"),
    "edit target empty": (["edit", "--source", "a red circle", "--target", " ", "-m", M], "target prompt is empty"),
    "edit source empty": (["edit", "--source", "", "--target", "a red circle", "-m", M], "source prompt is empty"),
    "edit blend empty": (["edit", "--source", "a red circle", "--target", "a green circle", "-m", M, "--blend", ","],
                         "--blend takes words"),
    "edit image empty": (["edit", "--source", "a red circle", "--target", "a green circle", "-m", M, "--image", ""],
                         "'--image': is empty"),
    "reweight modes empty": (["reweight", "a red circle", "-m", M, "--word", "red", "--weights=2", "--modes", ""],
                             "unknown reweight mode ''"),
    "reweight select empty": (["reweight", "a red circle", "-m", M, "--select", " "], "--select names"),
    "report folder empty": (["report", ""], "is empty"),
    "maps window empty": (["maps", "a red circle", "-m", M, "--window", ""], "empty item"),
    "controlnet empty": (["generate", "x", "-m", M, "--controlnet", ""], "--controlnet has an empty path"),
    "control image empty item": (["generate", "x", "-m", M, "--controlnet", "a-file", "--control-image", "a-file,"],
                                 "--control-image has an empty path"),
    "ip-adapter empty": (["generate", "x", "-m", M, "--ip-adapter", " "], "--ip-adapter is empty"),
    "ip-image empty": (["generate", "x", "-m", M, "--ip-image", ""], "--ip-image has an empty path"),
    "sweep out empty": (["sweep", "prompt.yaml", "--out", ""], "'--out': is empty"),
}


def run_case(argv: list[str], model: Path):
    args = [str(model) if a == M else a for a in argv]
    if args[0] in ("generate", "maps", "reweight", "edit"):
        args += ["--no-progress"]
    return CliRunner().invoke(app, args)


def assert_refused(result, fragment: str) -> None:
    assert result.exit_code == 2, (result.output, result.exception)
    assert fragment in result.output, result.output
    assert "Traceback" not in result.output
    assert result.exception is None or isinstance(result.exception, SystemExit)  # no exception escaped
    lines = [line for line in result.output.splitlines() if line.startswith("Error:")]
    assert len(lines) == 1, result.output


@pytest.mark.parametrize("argv, fragment", list(CASES.values()), ids=list(CASES))
def test_bad_input_is_refused_and_changes_nothing(place, sd1_path, argv, fragment):
    before = snapshot(place)
    result = run_case(argv, sd1_path)
    assert_refused(result, fragment)
    assert snapshot(place) == before


def test_read_only_file_system_is_a_user_error(place, sd1_path, monkeypatch):
    """The suite runs as root, where permissions cannot make a folder unwritable: mkdir fails with EROFS instead."""
    real_mkdir = Path.mkdir

    def read_only(self, *args, **kwargs):
        if "ro" in self.parts:
            raise OSError(errno.EROFS, "Read-only file system", str(self))
        return real_mkdir(self, *args, **kwargs)

    monkeypatch.setattr(Path, "mkdir", read_only)
    before = snapshot(place)
    result = run_case(["generate", "x", "-m", M, *FAST, "--out", "ro/run"], sd1_path)
    assert_refused(result, "Read-only file system")
    assert snapshot(place) == before


def tampered_maps(place: Path, sd1_path: Path, change) -> Path:
    folder = place / "maps-run"
    result = CliRunner().invoke(app, ["maps", "a red circle", "-m", str(sd1_path), *FAST, "--out", str(folder)])
    assert result.exit_code == 0, result.output
    manifest = folder / "manifest.json"
    manifest.write_text(change(manifest.read_text()))
    return folder


@pytest.mark.parametrize("change, fragment", [
    (lambda text: text[: len(text) // 2], "cannot be read as JSON"),
    (lambda text: "[1, 2]", "JSON object"),
    (lambda text: json.dumps({**json.loads(text), "maps": {**json.loads(text)["maps"], "layers": "x"}}),
     "cannot be read back"),
    (lambda text: json.dumps({**json.loads(text), "maps": {**json.loads(text)["maps"], "rows": [{}]}}),
     "cannot be read back"),
], ids=["cut", "list", "layers", "rows"])
def test_report_on_a_tampered_manifest(place, sd1_path, change, fragment):
    folder = tampered_maps(place, sd1_path, change)
    before = snapshot(place)
    result = CliRunner().invoke(app, ["report", str(folder)])
    assert_refused(result, fragment)
    assert snapshot(place) == before


@pytest.mark.parametrize("argv, fragment", [
    (["generate", "x", "--guidance", "nan"], "finite"),
    (["generate", "x", "--size", "²"], "digits 0-9"),
    (["generate", "x", "--seed", str(2**64)], "seed must be between"),
], ids=["nan", "superscript", "seed"])
def test_a_real_process_prints_one_line_and_no_traceback(tmp_path, argv, fragment):
    done = subprocess.run([sys.executable, "-m", "xattn", *argv], cwd=tmp_path, capture_output=True, text=True,
                          timeout=300, env={"HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin"})
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == [line for line in done.stderr.strip().splitlines()
                                                 if line.startswith("Error:")]
    assert fragment in done.stderr and "Traceback" not in done.stderr + done.stdout
    assert list(tmp_path.iterdir()) == []


def test_copying_a_model_folder_for_the_table_keeps_it_loadable(place, sd1_path):
    """The .bin-only folder differs from a good one only by its weights: the good one loads."""
    shutil.copytree(sd1_path, place / "good")
    result = run_case(["generate", "x", "-m", str(place / "good"), *FAST, "--out", "ok"], sd1_path)
    assert result.exit_code == 0, result.output
