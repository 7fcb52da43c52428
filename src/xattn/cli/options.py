"""The typed options every generating command shares (``common.Seed``, ``common.Size``...).

Every option defaults to ``None`` so that a ``--config`` file or the model's
``xattn_defaults.json`` can fill it (``--syntax`` defaults to ``a1111``, which a
config still overrides: only a typed value beats the config); numbers are checked after merging, by
:func:`xattn.validate.check_settings`, so the command line, configs, sweeps
and PNG parameters all pass the same checks.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal, Optional

import typer

from ..app import runner
from ..validate import DEFAULT_MAX_PIXELS


def given_path(text: str | Path) -> Path:
    """A path option's value; an empty one (a script's unset variable) is refused, not read as the current folder."""
    if isinstance(text, Path):
        return text
    if not text.strip():
        raise typer.BadParameter("is empty; give a path ('.' for the current folder)")
    return Path(text)


Model = Annotated[Optional[str], typer.Option(
    "--model", "-m", show_default="the embedded shapes-world model",
    help="Pipeline folder, a Hub id already in the local Hugging Face cache, or a single-file .safetensors checkpoint (with --config-folder).")]
ConfigFolder = Annotated[Optional[Path], typer.Option(
    "--config-folder", parser=given_path,
    help="For a single-file .safetensors --model: a diffusers pipeline folder of the same "
         "architecture whose JSON configs and tokenizers are read (offline; its weights are not).")]
LoraDir = Annotated[Optional[Path], typer.Option(
    "--lora-dir", parser=given_path,
    help="Folder of LoRA files: a <lora:NAME:WEIGHT> tag in the prompt loads NAME.safetensors from it "
         "at that weight, as A1111 does (without it the tags are removed, with a warning).")]
DeviceName = Literal[tuple(runner.DEVICES)]
DtypeName = Literal[("auto", *runner.DTYPES)]
SchedulerName = Literal[tuple(runner.SCHEDULERS)]

Device = Annotated[Optional[DeviceName], typer.Option(
    show_default="auto", help="Where to run: auto picks cuda, then mps, then cpu.")]
Dtype = Annotated[Optional[DtypeName], typer.Option(
    show_default="auto", help="Precision: auto is float16 on CUDA and float32 elsewhere.")]
Scheduler = Annotated[Optional[SchedulerName], typer.Option(
    show_default="the model's own", help="Sampler, mapped to a diffusers scheduler built from the model's config.")]
Seed = Annotated[Optional[int], typer.Option(show_default="0",
                                             help="Seed of the first image (0 to 2**64-1); image i uses seed + i.")]
Steps = Annotated[Optional[int], typer.Option(show_default="model default or 25", help="Number of denoising steps.")]
Guidance = Annotated[Optional[float], typer.Option(show_default="model default or 5.0",
                                                   help="Classifier-free guidance scale.")]
Size = Annotated[Optional[str], typer.Option(show_default="the model's native size",
                                             help="Image size: 64 or WIDTHxHEIGHT such as 512x768.")]
MaxPixels = Annotated[Optional[int], typer.Option(
    "--max-pixels", show_default=str(DEFAULT_MAX_PIXELS),
    help="Largest image (width x height) to accept; a larger --size is refused with the memory it needs.")]
Threads = Annotated[Optional[int], typer.Option(
    show_default="1 for a small model on the CPU, else torch's default",
    help="CPU threads torch samples with (images can differ by one level between counts).")]
SyntaxName = Literal["a1111", "compel"]  # xattn.prompts.SYNTAXES
Syntax = Annotated[SyntaxName, typer.Option(
    "--syntax", help="How the prompt's weights are written: a1111 ('(red:1.5)', '[red]') or compel ('red++', "
                     "'(red)1.5'); see docs/prompts.md.")]
NegativePrompt = Annotated[Optional[str], typer.Option("--negative-prompt", "-n", help="Negative prompt.")]
Out = Annotated[Optional[Path], typer.Option(
    parser=given_path, show_default="a new outputs/<command>-<time>-<slug>",
    help="Output folder: new, empty, or one whose run failed (its files are replaced).")]
OverwriteFailed = Annotated[bool, typer.Option(
    "--overwrite-failed", help="Reuse an --out whose run never finished (its manifest still says running).")]
Config = Annotated[Optional[Path], typer.Option(
    "--config", "-c", parser=given_path, help="YAML file of option values (see configs/); the command line wins.")]
Progress = Annotated[bool, typer.Option("--progress/--no-progress", help="Show progress bars.")]


def examples(*lines: str) -> str:
    """An ``epilog`` for ``--help``: the given command lines under 'Examples'."""
    body = "\n".join(f"  $ {line}" for line in lines)
    return f"Examples:\n\n\b\n{body}"  # \b: click keeps the lines unwrapped


# -- ControlNets and IP-Adapters (generate, maps, reweight) ----------------------------------------

ControlNet = Annotated[Optional[str], typer.Option(
    "--controlnet", help="ControlNet folder(s) saved with save_pretrained (safetensors), comma-separated for "
                         "several; switches to the ControlNet pipeline of an SD 1.x/2.x or SDXL model.")]
ControlImage = Annotated[Optional[str], typer.Option(
    "--control-image", help="Control image(s), one per --controlnet, comma-separated, of the run's --size.")]
ControlScale = Annotated[Optional[str], typer.Option(
    "--control-scale", show_default="1.0", help="ControlNet conditioning scale: one, or one per ControlNet (0.5,1).")]
IPAdapter = Annotated[Optional[str], typer.Option(
    "--ip-adapter", help="IP-Adapter folder (one .safetensors of image_proj.*/ip_adapter.* keys and an "
                         "image_encoder/ folder) or that .safetensors file; UNet models only.")]
IPImage = Annotated[Optional[str], typer.Option(
    "--ip-image", help="The image the IP-Adapter conditions on (comma-separated: several images).")]
IPScale = Annotated[Optional[float], typer.Option(
    "--ip-scale", show_default="1.0", help="IP-Adapter scale (pipe.set_ip_adapter_scale).")]


def attach_adapters(run) -> dict:
    """Load the run's --controlnet / --ip-adapter into ``run.pipe``; the pipeline-call arguments they need.

    The pipeline becomes its ControlNet pipeline when ControlNets are given; the manifest's ``model``
    records the folders, images and scales. Refused with a named error (exit code 2) before anything is written.
    """
    adapters = runner.read_adapters(run.settings)
    if adapters is None:
        return {}
    run.pipe = runner.attach_adapters(run.pipe, adapters, run.settings.get("size"))
    return runner.adapter_call_kwargs(adapters)
