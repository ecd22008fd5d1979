"""`fieldline sim fit`: the grid table, the model file and the plots."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from scipy.signal import lfilter
from typer.testing import CliRunner

from fieldline.cli import app
from simulator.arma import load_model
from simulator.errors import ModelError

runner = CliRunner()


@pytest.fixture
def csv_file(tmp_path: Path) -> Path:
    e = np.random.default_rng(8).normal(size=700)
    y = 40.0 + lfilter([1.0], [1.0, -0.8], e)[100:]
    path = tmp_path / "room.csv"
    rows = [f"2024-03-01 {i // 60:02d}:{i % 60:02d}:00,{v:.1f}" for i, v in enumerate(y)]
    path.write_text("time,rh\n" + "\n".join(rows) + "\n")
    return path


def test_fit_writes_model_and_plots(csv_file: Path, tmp_path: Path) -> None:
    out, plots = tmp_path / "m" / "rh.json", tmp_path / "plots"
    args = ["sim", "fit", str(csv_file), "--column", "rh", "--max-p", "2", "--max-q", "1"]
    args += ["--name", "rh", "--unit", "%RH", "--lo", "0", "--hi", "100"]
    result = runner.invoke(app, [*args, "--out", str(out), "--plot", str(plots)])
    assert result.exit_code == 0, result.output
    assert "AIC grid" in result.output
    assert "chosen: ARMA(1,0)" in result.output
    assert "ADF statistic" in result.output
    model = load_model(out)
    assert (model.p, model.q, model.name, model.unit, model.lo, model.hi) == (
        1,
        0,
        "rh",
        "%RH",
        0.0,
        100.0,
    )
    assert model.ar == pytest.approx([0.8], abs=0.05)
    assert model.resolution == pytest.approx(0.1)
    assert model.source is not None
    assert model.source.interval_s == 60.0
    names = sorted(p.name for p in plots.iterdir())
    assert names == ["acf_pacf.png", "aic_grid.png", "fitted.png", "series.png"]
    for png in plots.iterdir():
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert png.stat().st_size > 10_000


def test_fit_prints_json_without_out(csv_file: Path) -> None:
    result = runner.invoke(app, ["sim", "fit", str(csv_file), "-c", "rh", "--max-p", "1"])
    assert result.exit_code == 0, result.output
    text = result.output[result.output.index("{") :]
    assert json.loads(text)["format"] == "fieldline.arma/1"


def test_fit_errors_are_simulator_errors(csv_file: Path) -> None:
    result = runner.invoke(app, ["sim", "fit", str(csv_file), "--column", "co2"])
    assert isinstance(result.exception, ModelError)
    assert "no column 'co2'; its columns are time, rh" in str(result.exception)


def test_help_explains_the_command() -> None:
    # Help is for people and rich fits it to the terminal: read it on a wide one.
    result = runner.invoke(app, ["sim", "fit", "--help"], env={"COLUMNS": "200"})
    assert result.exit_code == 0
    for words in ("--max-p", "--stabilise", "--min-root", "--plot", "AIC"):
        assert words in result.output
