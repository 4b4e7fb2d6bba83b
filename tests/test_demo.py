"""The demo runs end to end at small sizes."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from modelbatch.cli import main as cli_main
from modelbatch.demo import run_demo


def test_demo_end_to_end(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    result = run_demo(
        lrs=[1e-3, 1e-2],
        weight_decays=[0.0, 1e-3],
        seeds=[0, 1],
        epochs=2,
        out_dir=tmp_path,
        progress=False,
    )
    out = capsys.readouterr().out
    assert "Leaderboard: 8 MLPs" in out
    assert "speedup" in out
    assert (tmp_path / "demo_sweep.png").stat().st_size > 10_000
    acc = result["val_acc"]
    assert acc.shape == (8,) and float(acc.max()) > 0.5  # learns something in 2 epochs
    assert math.isfinite(result["speedup"])  # type: ignore[arg-type]
    # At these gentle learning rates, the batched models equal the one-by-one models.
    assert float(result["max_rel_weight_diff"]) < 1e-4  # type: ignore[arg-type]


def test_demo_command_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code = cli_main(
        [
            "demo",
            "--lrs",
            "2",
            "--wds",
            "1",
            "--seeds",
            "1",
            "--epochs",
            "1",
            "--no-progress",
            "--no-sequential",
            "--out",
            str(tmp_path),
        ]
    )
    assert code == 0
    assert "Leaderboard: 2 MLPs" in capsys.readouterr().out
    assert (tmp_path / "demo_sweep.png").exists()


def test_cli_usage_and_unknown_command(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli_main([]) == 2
    assert cli_main(["--help"]) == 0
    assert cli_main(["nope"]) == 2
    assert "unknown command 'nope'" in capsys.readouterr().err
