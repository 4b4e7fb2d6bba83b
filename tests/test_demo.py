"""The demo runs end to end at small sizes."""

from __future__ import annotations

import math
import sys
from pathlib import Path

import pytest
import torch

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
    from modelbatch import __version__

    assert captured.out.splitlines()[-1].startswith(f"modelbatch {__version__} (torch ")
    # Sorts after the prototype that the public package index holds as modelbatch 0.1.0.
    assert tuple(int(p) for p in __version__.split(".")[:2]) > (0, 1)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--seeds", "0"], "--seeds must be at least 1"),
        (["--epochs", "many"], "argument --epochs: invalid int value: 'many'"),
        (["--device", "nonsense"], "--device 'nonsense': not a device name"),
        (["--device", "meta"], "only cpu and cuda are supported"),
        (["--dtype", "float16"], "invalid choice: 'float16'"),
    ],
)
def test_demo_usage_errors_exit_2_with_one_line(
    capsys: pytest.CaptureFixture[str], args: list[str], message: str
) -> None:
    assert cli_main(["demo", *args]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a CUDA device")
def test_demo_cuda_without_a_gpu_exits_2(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli_main(["demo", "--device", "cuda"]) == 2
    assert "sees no CUDA device" in capsys.readouterr().err


def test_missing_extra_is_one_line_and_no_progress_needs_no_tqdm(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setitem(sys.modules, "tqdm", None)  # as if not installed
    assert cli_main(["demo", "--lrs", "1", "--epochs", "1", "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.strip() == (
        "modelbatch demo: the demo needs tqdm (or pass --no-progress); install the demo "
        "extra from the ModelBatch repository: pip install -e '.[demo]'"
    )
    args = ["demo", "--lrs", "1", "--wds", "1", "--seeds", "1", "--epochs", "1", "--no-progress"]
    assert cli_main([*args, "--no-sequential", "--out", str(tmp_path)]) == 0
    assert (tmp_path / "demo_sweep.png").exists()


def test_help_shows_the_defaults(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli_main(["demo", "--help"]) == 0
    demo_help = capsys.readouterr().out
    assert "(default: 15)" in demo_help and "(default: demo_out)" in demo_help
    assert cli_main(["bench", "--help"]) == 0
    bench_help = capsys.readouterr().out
    assert "(default: 20)" in bench_help and "(default: mlp)" in bench_help
