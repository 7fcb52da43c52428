"""Property test of the CLI's numeric options: a value is refused (exit 2, one Error line) exactly when an
independent reference says it is out of range, and an accepted value reaches model loading unchanged."""

from __future__ import annotations

import warnings
from unittest import mock

import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

from xattn.app import runner
from xattn.cli import app


class Reached(Exception):
    """Raised in place of loading the model: every check passed."""


def float32_finite(value: float) -> bool:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # numpy warns when the cast overflows
        return bool(np.isfinite(np.float32(value)))


def invoke(sd1_path, *options: str):
    seen = {}

    def load(model, **kwargs):
        seen.update(kwargs)
        raise Reached

    with mock.patch.object(runner, "load_pipeline", load):
        result = CliRunner().invoke(app, ["generate", "x", "-m", str(sd1_path), "--no-progress", *options])
    return result


def check(result, valid: bool) -> None:
    if valid:
        assert isinstance(result.exception, Reached), result.output
    else:
        assert result.exit_code == 2, result.output
        assert [line for line in result.output.splitlines() if line.startswith("Error:")], result.output
        assert "Traceback" not in result.output


FUZZ = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


@FUZZ
@given(guidance=st.floats(allow_nan=True, allow_infinity=True) | st.sampled_from([3.4028235e38, 3.4028236e38]),
       seed=st.integers(-5, 2**65), steps=st.integers(-3, 20_000))
def test_guidance_seed_and_steps(sd1_path, guidance, seed, steps):
    result = invoke(sd1_path, "--guidance", repr(guidance), "--seed", str(seed), "--steps", str(steps))
    check(result, float32_finite(guidance) and 0 <= seed < 2**64 and 1 <= steps <= 10_000)


@FUZZ
@given(width=st.integers(-16, 4200), height=st.integers(-16, 4200))
def test_sizes(sd1_path, width, height):
    result = invoke(sd1_path, "--size", f"{width}x{height}")
    check(result, width > 0 and height > 0 and width % 8 == 0 and height % 8 == 0 and width * height <= 2048 * 2048)


@FUZZ
@given(text=st.text(alphabet="0123456789x²³١٢٣૪ .-", min_size=1, max_size=8))
def test_size_text_in_other_digits_is_refused(sd1_path, text):
    ascii_form = text.strip().lower()
    parts = ascii_form.split("x")
    plain = 1 <= len(parts) <= 2 and all(p.strip().isascii() and p.strip().isdigit() for p in parts)
    if plain:
        width, height = int(parts[0]), int(parts[-1])
        plain = width > 0 and height > 0 and width % 8 == 0 and height % 8 == 0 and width * height <= 2048 * 2048
    check(invoke(sd1_path, "--size", text), plain)
