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
    assert "Weights equal to the one-by-one run within 1e-4 (relative): 8/8 models" in out
    # ... and so reach the same validation accuracies (at most one of 360 samples apart).
    gap = (result["val_acc_sequential"] - acc).abs()  # type: ignore[operator]
    assert float(gap.max()) <= 1 / 360 + 1e-6
    assert "Validation accuracy, batched vs one by one" in out


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
    assert cli_main(["--version"]) == 0
    captured = capsys.readouterr()
    assert "unknown command 'nope'" in captured.err
    assert captured.out.splitlines()[-1].startswith("modelbatch 0.")


def test_demo_rejects_empty_sweep(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        cli_main(["demo", "--seeds", "0"])
    assert exc.value.code == 2
    assert "--seeds must be at least 1" in capsys.readouterr().err
