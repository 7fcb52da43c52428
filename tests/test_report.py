"""The HTML report: one self-contained file; in a real headless Chromium, picking a word changes the map."""

from __future__ import annotations

import base64
import io
import re
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

import tiny_models
import xattn
from xattn.capture import Capture, MapLayer, WordMaps
from xattn.capture.report import write_report
from xattn.hookpoints import Row
from xattn.tokens import TokenMap

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
PROMPT = "a red cat"
SIDE = 8  # the synthetic maps' side


def left_right_maps(per_step: bool = True) -> WordMaps:
    """'red' lives on the left half, 'cat' on the right half, at every step; step 2 flips them."""
    token_map = TokenMap(tiny_models.tokenizer(), PROMPT)
    red, cat = token_map.indices("red")[0], token_map.indices("cat")[0]
    layers = []
    for step in range(3):
        data = torch.full((1, 1, SIDE, SIDE, 77), 0.01)  # [rows, heads, h, w, j]
        left, right = (red, cat) if step < 2 else (cat, red)
        data[..., : SIDE // 2, left] = 0.5
        data[..., SIDE // 2 :, right] = 0.5
        layers.append(MapLayer("cross", (SIDE, SIDE), (step,), ("site",), 1, None,
                               data=data.view(1, 1, SIDE * SIDE, 77)))
    return WordMaps(layers, rows=(Row(True, 0, 0),), columns=None, prompts=[PROMPT], token_maps=[token_map],
                    image_size=(SIDE, SIDE), num_steps=3)


def white_image():
    return [Image.new("RGB", (SIDE, SIDE), "white")]


def test_report_is_one_self_contained_file(tmp_path):
    path = write_report(left_right_maps(), white_image(), tmp_path / "report.html")
    page = path.read_text()
    assert "<script src" not in page and "<link" not in page
    assert not re.search(r"(src|href)=[\"']?(https?:)?//", page)  # nothing fetched from a network
    assert "data:image/png;base64," in page
    assert page.count("<script") == 2  # the JSON data and the inline code


def test_report_never_overwrites_and_checks_the_images(tmp_path):
    path = write_report(left_right_maps(), white_image(), tmp_path / "report.html")
    with pytest.raises(FileExistsError, match="never overwritten"):
        write_report(left_right_maps(), white_image(), path)
    with pytest.raises(ValueError, match="1 prompt"):
        write_report(left_right_maps(), white_image() * 2, tmp_path / "other.html")


# -- in a real browser -----------------------------------------------------------------------

@pytest.fixture
def browser_page():
    if CHROMIUM is None:
        pytest.skip("Chromium is not installed (apt-get install chromium)")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        page = browser.new_page()
        errors: list[str] = []
        page.on("pageerror", lambda error: errors.append(str(error)))
        yield page, errors
        browser.close()


def shown_map(page) -> np.ndarray:
    """The overlay canvas as an RGB array."""
    url = page.evaluate("document.getElementById('view').toDataURL('image/png')")
    png = base64.b64decode(url.split(",", 1)[1])
    return np.asarray(Image.open(io.BytesIO(png)).convert("RGB")).astype(float)


def left_minus_right(pixels: np.ndarray) -> float:
    """Brightness of the left half minus the right half (the 'gray' colormap: bright = attended)."""
    half = pixels.shape[1] // 2
    return pixels[:, :half].mean() - pixels[:, half:].mean()


def wait_for(page, state: str):
    page.wait_for_function(f"document.body.dataset.shown === {state!r}")


@pytest.mark.browser
def test_picking_a_word_a_step_range_and_a_resolution_changes_the_map(tmp_path, browser_page):
    page, errors = browser_page
    path = write_report(left_right_maps(), white_image(), tmp_path / "report.html", cmap="gray", alpha=1.0)
    page.goto(path.as_uri())
    page.wait_for_function("document.body.dataset.shown !== undefined")

    page.select_option("#word", "red")
    wait_for(page, "0|red|all|0,1,2")
    red = shown_map(page)
    assert left_minus_right(red) > 20  # red is mostly on the left over steps 0-2

    page.select_option("#word", "cat")
    wait_for(page, "0|cat|all|0,1,2")
    cat = shown_map(page)
    assert np.abs(cat - red).max() > 50  # the shown map changed
    assert left_minus_right(cat) < -20

    page.select_option("#step-from", "2")
    wait_for(page, "0|cat|all|2")
    assert left_minus_right(shown_map(page)) > 20  # at step 2 cat moved to the left

    page.select_option("#res", f"{SIDE}x{SIDE}")
    wait_for(page, f"0|cat|{SIDE}x{SIDE}|2")

    page.click(".token[data-word='red']")
    wait_for(page, f"0|red|{SIDE}x{SIDE}|2")
    assert left_minus_right(shown_map(page)) < -20
    assert page.input_value("#word") == "red"
    assert errors == []


@pytest.mark.browser
def test_report_of_a_real_capture_shows_tokens_with_their_share(sd1_pipe, tmp_path, browser_page):
    page, errors = browser_page
    capture = Capture()
    with xattn.hooks(sd1_pipe, capture):
        images = sd1_pipe(["a red cat", "a blue dog"], num_images_per_prompt=2, num_inference_steps=2,
                          guidance_scale=5.0, height=32, width=32).images
    maps = capture.maps()
    path = write_report(maps, images, tmp_path / "report.html")
    totals = maps.token_totals(0, 0)
    most_attended = max(maps.words(0), key=totals.get)
    page.goto(path.as_uri())
    wait_for(page, f"0|{most_attended}|all|all")  # the page opens on the most attended word
    chips = page.locator(".token").all_inner_texts()
    assert [chip.split("\n")[0] for chip in chips] == ["<start>", "a", "red", "cat", "<end>", "<pad>"]
    first = shown_map(page)
    page.select_option("#item", "3")  # prompt 1, image 1
    page.wait_for_function("document.body.dataset.shown.startsWith('3|')")
    assert np.abs(shown_map(page) - first).max() > 0
    assert "blue" in page.locator("#word option").all_inner_texts()
    assert errors == []


HOSTILE = "a red <!-- cat </script><script>window.pwned=1</script> \"quoted\" 'single' & \x07bell {{DATA}}"


def test_user_text_reaches_the_page_only_as_escaped_data(sd1_pipe, tmp_path):
    capture = Capture()
    with xattn.hooks(sd1_pipe, capture):
        images = sd1_pipe(HOSTILE, num_inference_steps=1, guidance_scale=5.0, height=32, width=32).images
    page = write_report(capture.maps(), images, tmp_path / "report.html", title=HOSTILE).read_text()
    data = page.split('<script type="application/json" id="xattn-data">', 1)[1].split("</script>", 1)[0]
    assert "<" not in data and ">" not in data and "&" not in data  # \u003c... only: nothing HTML could read
    title = page.split("<title>")[1].split("</title>")[0]
    assert page.count("<script") == 2 and "<" not in title and "&lt;script&gt;window.pwned" in title
    assert "{{DATA}}" in title  # one substitution pass: a placeholder in a prompt stays text


@pytest.mark.browser
def test_hostile_prompt_leaves_the_page_working(sd1_pipe, tmp_path, browser_page):
    page, errors = browser_page
    capture = Capture()
    with xattn.hooks(sd1_pipe, capture):
        images = sd1_pipe(HOSTILE, num_inference_steps=1, guidance_scale=5.0, height=32, width=32).images
    maps = capture.maps()
    path = write_report(maps, images, tmp_path / "report.html", title=HOSTILE)
    page.goto(path.as_uri())
    page.wait_for_function("document.body.dataset.shown !== undefined")  # the script ran to the end
    assert page.evaluate("window.pwned") is None
    assert page.title() == HOSTILE.replace("\x07", "")  # control characters dropped from the title only
    chips = [chip.split("\n")[0] for chip in page.locator(".token").all_inner_texts()]
    assert "<!--" in chips and "</" in "".join(chips)  # the words arrive as text
    labels = page.locator("#item option").all_inner_texts()
    assert HOSTILE.replace("\x07", "") in labels[0].replace("\x07", "")
    page.select_option("#word", "cat")
    page.wait_for_function("document.body.dataset.shown.includes('|cat|')")
    assert errors == []
