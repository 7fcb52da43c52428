"""One self-contained HTML file to explore word maps: pick a word, a step range, a resolution.

Everything is inside the file: the images as PNG data URIs, each word's
maps per (step, resolution) as base64 bytes, matplotlib's colormap as a
lookup table, and a few lines of plain JavaScript (no CDN, no framework)
that add the chosen maps, divide by their call count, scale to [0, 1] and
paint the overlay on a canvas. The prompt's tokens are listed with their
share of the attention; clicking one shows its map. The page opens on the
most attended word.
"""

from __future__ import annotations

import base64
import html
import io
import json
import re
from pathlib import Path

import matplotlib
import numpy as np
import torch
from PIL import Image

from ..errors import XattnError
from ..files import OverwriteError, write_text_atomic
from ..tokens import TokenError
from .heatmaps import WordMaps
from .pictures import DEFAULT_ALPHA, DEFAULT_CMAP

MAP_SIDE = 64  # longest side of the maps embedded in the report; the canvas smooths them up
VIEW_SIDE = 320  # longest side of the overlay on screen, in CSS pixels
SPECIAL_TOKENS = ("<start>", "<end>")
# Inside <script>, "<!--", "<script" and "</script" change how HTML reads the text; JSON lets us write
# every <, > and & as a \u escape, so no user text (a prompt, a word) can ever be read as markup.
_SCRIPT_SAFE = str.maketrans({"<": "\\u003c", ">": "\\u003e", "&": "\\u0026",
                              "\u2028": "\\u2028", "\u2029": "\\u2029"})


class ReportError(XattnError, ValueError):
    """Maps and images that do not make a report (an unknown colormap, a wrong number of images)."""


def script_json(data) -> str:
    """``data`` as JSON safe to put inside a ``<script type="application/json">`` element."""
    return json.dumps(data, separators=(",", ":"), allow_nan=False).translate(_SCRIPT_SAFE)


def write_report(maps: WordMaps, images: list[Image.Image], path: str | Path, *, title: str | None = None,
                 cmap: str = DEFAULT_CMAP, alpha: float = DEFAULT_ALPHA) -> Path:
    """Write the report to ``path`` (a new file; an existing one is never overwritten).

    Args:
        maps: the word maps (``capture.maps()`` or ``load_maps(folder)``).
        images: the generated images in the pipeline's order (prompt by prompt,
            the images of each prompt in turn).
        path: the ``.html`` file to create.
        title: the page title; default the first prompt.
        cmap: a matplotlib colormap name.
        alpha: weight of the map over the image.
    """
    path = Path(path)
    if path.exists():
        raise OverwriteError(f"{path} exists; the report is never overwritten, choose a new path")
    expected = maps.num_prompts * maps.images_per_prompt
    if len(images) != expected:
        raise ReportError(f"got {len(images)} image(s), but the maps hold {maps.num_prompts} prompt(s) x "
                         f"{maps.images_per_prompt} image(s) = {expected}; pass them in the pipeline's order")
    return write_text_atomic(path, render_report(maps, images, title=title, cmap=cmap, alpha=alpha))


def render_report(maps: WordMaps, images: list[Image.Image], *, title: str | None = None,
                  cmap: str = DEFAULT_CMAP, alpha: float = DEFAULT_ALPHA) -> str:
    """The report's HTML text (see :func:`write_report`)."""
    height, width = maps.image_size
    scale = MAP_SIDE / max(height, width)
    side = (max(1, round(height * scale)), max(1, round(width * scale))) if scale < 1 else (height, width)
    items = []
    for prompt in range(maps.num_prompts):
        for image in range(maps.images_per_prompt):
            picture = images[prompt * maps.images_per_prompt + image]
            items.append(_item(maps, picture, prompt, image, side))
    data = {
        "side": list(side),
        "view": _view_size(height, width),
        "alpha": alpha,
        "colormap": _lookup_table(cmap),
        "resolutions": [f"{h}x{w}" for h, w in maps.word_resolutions],  # what word() combines by default
        "steps": maps.steps if maps.per_step else None,
        "items": items,
    }
    heading = title if title is not None else (maps.prompts[0] if maps.prompts and maps.prompts[0] else "xattn maps")
    values = {"TITLE": _text(heading), "DATA": script_json(data)}
    # One pass, so a prompt holding "{{DATA}}" stays text.
    return re.sub(r"\{\{(TITLE|DATA)\}\}", lambda match: values[match.group(1)], _PAGE)


def _text(value: str) -> str:
    """``value`` as HTML text: markup characters escaped, control characters (but tab and newline) dropped."""
    kept = "".join(ch for ch in value if ch in "\t\n" or not (ord(ch) < 32 or 127 <= ord(ch) < 160))
    return html.escape(kept, quote=True)


def _item(maps: WordMaps, picture: Image.Image, prompt: int, image: int, side: tuple[int, int]) -> dict:
    words = maps.words(prompt) + [t for t in SPECIAL_TOKENS if _captured(maps, t, prompt)]
    sums = maps.totals_by_step_and_res(words, prompt, image, size=side)
    encoded: dict[str, dict[str, list]] = {word: {} for word in words}
    counts: dict[str, int] = {}
    for (step, (h, w)), (total, count) in sums.items():
        key = f"{'all' if step is None else step}|{h}x{w}"
        counts[key] = count
        for index, word in enumerate(words):
            encoded[word][key] = _quantise(total[index])
    totals = maps.token_totals(prompt, image)
    label = maps.prompts[prompt] if maps.prompts and maps.prompts[prompt] else f"prompt {prompt}"
    return {
        "label": f"prompt {prompt}, image {image}: {label}",
        "image": _data_uri(picture),
        "words": words,
        "tokens": [{"name": name, "share": share} for name, share in totals.items()],
        "maps": encoded,
        "counts": counts,
    }


def _captured(maps: WordMaps, token: str, prompt: int) -> bool:
    """Whether ``token`` (``<start>``, ``<end>``) is in the prompt's text and its slots were kept:
    T5's text has no start token, so the report leaves it out there."""
    try:
        slots = maps.token_map(prompt).indices(token)
    except TokenError:
        return False
    return maps.columns is None or all(slot in maps.columns for slot in slots)


def _quantise(total: torch.Tensor) -> list:
    """[H, W] non-negative sums -> [scale, base64 of uint8 values]; value = scale * byte / 255."""
    scale = float(total.max())
    if scale <= 0:
        data = np.zeros(total.numel(), np.uint8)
    else:
        data = (total / scale * 255).round().clamp(0, 255).to(torch.uint8).flatten().numpy()
    return [scale, base64.b64encode(data.tobytes()).decode("ascii")]


def _lookup_table(cmap: str) -> list[list[int]]:
    try:
        colormap = matplotlib.colormaps[cmap]
    except KeyError:
        raise ReportError(f"unknown colormap {cmap!r}; use a matplotlib name such as 'inferno'") from None
    rgb = colormap(np.linspace(0.0, 1.0, 256))[:, :3]
    return (rgb * 255).round().astype(int).tolist()


def _view_size(height: int, width: int) -> list[int]:
    scale = VIEW_SIDE / max(height, width)
    return [round(height * scale), round(width * scale)]


def _data_uri(picture: Image.Image) -> str:
    buffer = io.BytesIO()
    picture.convert("RGB").save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


_PAGE = """<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<title>{{TITLE}}</title>
<style>
  body { font-family: system-ui, sans-serif; margin: 1.5rem; color: #222; max-width: 60rem; }
  h1 { font-size: 1.2rem; font-weight: 600; }
  .controls { display: flex; flex-wrap: wrap; gap: 1rem; align-items: end; margin: 1rem 0; }
  label { display: flex; flex-direction: column; font-size: 0.85rem; gap: 0.2rem; }
  .view { display: flex; gap: 1.5rem; align-items: flex-start; flex-wrap: wrap; }
  canvas, #original { border: 1px solid #ccc; }
  .tokens { display: flex; flex-wrap: wrap; gap: 0.4rem; margin-top: 1rem; }
  .token { border: 1px solid #bbb; border-radius: 4px; padding: 0.2rem 0.5rem; cursor: pointer;
           background: #fafafa; font-size: 0.9rem; min-width: 3rem; }
  .token.chosen { border-color: #b5361b; background: #fde9e3; }
  .token .bar { height: 4px; background: #b5361b; margin-top: 3px; }
  .token .share { font-size: 0.75rem; color: #666; }
  .note { font-size: 0.8rem; color: #666; }
</style>
</head>
<body>
<h1>{{TITLE}}</h1>
<div class="controls">
  <label>Image <select id="item"></select></label>
  <label>Word <select id="word"></select></label>
  <label>Resolution <select id="res"></select></label>
  <label>From step <select id="step-from"></select></label>
  <label>To step <select id="step-to"></select></label>
  <label>Map opacity <input type="range" id="alpha" min="0" max="1" step="0.05"></label>
</div>
<div class="view">
  <canvas id="view"></canvas>
  <img id="original" alt="the generated image">
  <div>
    <p id="caption"></p>
    <p class="note">Colour: the mean attention the word receives at each pixel over the chosen steps and
    resolutions, scaled from its lowest (dark) to its highest (bright) value.</p>
  </div>
</div>
<div class="tokens" id="tokens"></div>
<script type="application/json" id="xattn-data">{{DATA}}</script>
<script>
"use strict";
const data = JSON.parse(document.getElementById("xattn-data").textContent);
const $ = (id) => document.getElementById(id);
const [mapH, mapW] = data.side;
const decoded = new Map();
let picture = new Image();

function bytesOf(text) {
  if (!decoded.has(text)) {
    const raw = atob(text);
    const out = new Uint8Array(raw.length);
    for (let k = 0; k < raw.length; k++) out[k] = raw.charCodeAt(k);
    decoded.set(text, out);
  }
  return decoded.get(text);
}

function fill(select, entries) {
  select.innerHTML = "";
  for (const [value, text] of entries) {
    const option = document.createElement("option");
    option.value = value;
    option.textContent = text;
    select.appendChild(option);
  }
}

function chosenStepKeys() {
  if (data.steps === null) return ["all"];
  const from = Number($("step-from").value), to = Number($("step-to").value);
  return data.steps.filter((s) => s >= Math.min(from, to) && s <= Math.max(from, to)).map(String);
}

function chosenResolutions() {
  return $("res").value === "all" ? data.resolutions : [$("res").value];
}

function heatOf(item, word) {
  const sum = new Float64Array(mapH * mapW);
  let calls = 0;
  for (const step of chosenStepKeys()) {
    for (const res of chosenResolutions()) {
      const key = step + "|" + res;
      const entry = item.maps[word][key];
      if (!entry) continue;
      const [scale, text] = entry;
      const bytes = bytesOf(text);
      for (let k = 0; k < sum.length; k++) sum[k] += (scale * bytes[k]) / 255;
      calls += item.counts[key];
    }
  }
  let low = Infinity, high = -Infinity;
  for (let k = 0; k < sum.length; k++) { low = Math.min(low, sum[k]); high = Math.max(high, sum[k]); }
  const heat = new Float64Array(sum.length);
  for (let k = 0; k < sum.length; k++) heat[k] = high > low ? (sum[k] - low) / (high - low) : 0;
  return { heat, calls };
}

function render() {
  const item = data.items[Number($("item").value)];
  const word = $("word").value;
  const { heat, calls } = heatOf(item, word);
  const layer = document.createElement("canvas");
  layer.width = mapW; layer.height = mapH;
  const layerContext = layer.getContext("2d");
  const pixels = layerContext.createImageData(mapW, mapH);
  for (let k = 0; k < heat.length; k++) {
    const [r, g, b] = data.colormap[Math.min(255, Math.round(heat[k] * 255))];
    pixels.data.set([r, g, b, Math.round(Number($("alpha").value) * 255)], 4 * k);
  }
  layerContext.putImageData(pixels, 0, 0);
  const view = $("view");
  const context = view.getContext("2d");
  context.clearRect(0, 0, view.width, view.height);
  context.imageSmoothingEnabled = false;
  context.drawImage(picture, 0, 0, view.width, view.height);
  context.imageSmoothingEnabled = true;
  context.drawImage(layer, 0, 0, view.width, view.height);
  const steps = chosenStepKeys();
  const stepText = data.steps === null ? "all steps (aggregated)" :
    (steps.length === 1 ? "step " + steps[0] : "steps " + steps[0] + "-" + steps[steps.length - 1]);
  $("caption").textContent = "\\u201c" + word + "\\u201d, " + stepText + ", " +
    ($("res").value === "all" ? "all resolutions" : $("res").value) + " (" + calls + " attention calls)";
  for (const chip of document.querySelectorAll(".token")) {
    chip.classList.toggle("chosen", chip.dataset.word === word);
  }
  document.body.dataset.shown = [$("item").value, word, $("res").value, steps.join(",")].join("|");
}

function showItem() {
  const item = data.items[Number($("item").value)];
  const previous = $("word").value;
  fill($("word"), item.words.map((w) => [w, w]));
  const shares = new Map(item.tokens.map((t) => [t.name, t.share]));
  const words = item.words.filter((w) => !w.startsWith("<"));
  const mostAttended = words.reduce((best, w) => (shares.get(w) > shares.get(best) ? w : best), words[0]);
  $("word").value = item.words.includes(previous) ? previous : mostAttended;
  const tokens = $("tokens");
  tokens.innerHTML = "";
  // Bars are scaled to the most attended word; <start>, <end> and <pad> can take far more and are capped.
  const wordShares = item.tokens.filter((t) => !t.name.startsWith("<")).map((t) => t.share);
  const largest = Math.max(...(wordShares.length ? wordShares : item.tokens.map((t) => t.share)));
  for (const token of item.tokens) {
    const chip = document.createElement("div");
    chip.className = "token";
    chip.dataset.word = token.name;
    chip.title = "share of all attention: " + (100 * token.share).toFixed(2) + "%";
    chip.innerHTML = "<div></div><div class='share'></div><div class='bar'></div>";
    chip.children[0].textContent = token.name;
    chip.children[1].textContent = (100 * token.share).toFixed(1) + "%";
    chip.children[2].style.width = Math.min(100, (100 * token.share) / largest).toFixed(0) + "%";
    if (item.words.includes(token.name)) {
      chip.addEventListener("click", () => { $("word").value = token.name; render(); });
    } else {
      chip.style.cursor = "default";
    }
    tokens.appendChild(chip);
  }
  picture = new Image();
  picture.onload = render;
  picture.src = item.image;
  $("original").src = item.image;
}

function setup() {
  fill($("item"), data.items.map((item, k) => [String(k), item.label]));
  fill($("res"), [["all", "all"], ...data.resolutions.map((r) => [r, r])]);
  const steps = data.steps === null ? [["all", "all (aggregated)"]] : data.steps.map((s) => [String(s), String(s)]);
  fill($("step-from"), steps);
  fill($("step-to"), steps);
  $("step-to").value = steps[steps.length - 1][0];
  for (const id of ["step-from", "step-to"]) $(id).disabled = data.steps === null;
  const view = $("view");
  [view.height, view.width] = data.view;
  [$("original").height, $("original").width] = data.view;
  $("alpha").value = String(data.alpha);
  $("item").addEventListener("change", showItem);
  for (const id of ["word", "res", "step-from", "step-to"]) $(id).addEventListener("change", render);
  $("alpha").addEventListener("input", render);
  showItem();
}

setup();
</script>
</body>
</html>
"""
