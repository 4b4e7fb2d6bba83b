"""The step profile (benchmarks/profile_step.py): counts that reproduce issue 9's table for
the torch.func recipe and one model alone, ModelBatch's loss and BatchNorm phases, and the
report's command line (tiny sizes)."""

from __future__ import annotations

import pytest
import torch

from modelbatch.bench.profile import PHASES, KernelCounter, format_table, main, profile


def test_kernel_counter_counts_kernels_not_views() -> None:
    x = torch.ones(4, 3)
    with KernelCounter() as k:
        with k.phase("forward"):
            y = (x.t().reshape(-1) + 1).view(3, 4)  # t, reshape (a copy), add, view
            z = y.mul(2)
        z.sum()
    assert k.counts["forward"] == 3 and k.counts["other"] == 1 and k.total == 4


def test_reference_counts_match_the_issue_table() -> None:
    """MLP: one model alone 27 kernels per step, the recipe with foreach Adam 42, of which 7
    for the optimizer (issue 9's table, steady-state step, torch.optim's host step counters
    excluded)."""
    alone = profile("mlp", "alone", 1, count_batch=2, time_steps=0)
    recipe = profile("mlp", "recipe", 2, count_batch=2, time_steps=0)
    assert alone.total_kernels == 27 and recipe.total_kernels == 42
    assert alone.kernels["optimizer"] == recipe.kernels["optimizer"] == 7
    # foreach Adam, fp32, counted per kernel (reads, plus the tensors written in place):
    # lerp_ 12, mul_ 8, addcmul_ 16 (grad read twice), sqrt 8, div_ 8, add_ 8, addcdiv_ 16.
    assert recipe.opt_bytes_per_element == pytest.approx(76.0, abs=0.5)


def test_modelbatch_mlp_runs_one_model_s_forward_and_fewer_kernels_than_the_recipe() -> None:
    """Each nn.Linear is one baddbmm forward (what one model alone runs: one addmm) and two
    bmm and a sum backward, with the weights' gradients contiguous (no copy into the
    parameters' layout); the loss is one flat loss call plus the per-model reduction."""
    mb = profile("mlp", "modelbatch", 2, count_batch=2, time_steps=2)
    recipe = profile("mlp", "recipe", 2, count_batch=2, time_steps=0)
    alone = profile("mlp", "alone", 1, count_batch=2, time_steps=0)
    assert set(mb.kernels) == set(PHASES)
    assert mb.kernels["forward"] == alone.kernels["forward"] == 5
    # The loss's [N] reduction adds a div and the expand of the per-model sum a copy.
    assert mb.kernels["backward"] <= alone.kernels["backward"] + 2
    assert mb.top_ops["backward"].get("clone", 0) <= 1
    assert mb.kernels["loss"] <= recipe.kernels["loss"] + 4  # one loss call + [N] reduction
    assert mb.total_kernels < recipe.total_kernels
    assert mb.host_ms > 0


def test_resnet8_batchnorm_forward_below_the_recipe_and_saved_bytes_per_model() -> None:
    mb = profile("resnet8", "modelbatch", 2, count_batch=2, saved_batch=4, time_steps=0, spatial=8)
    alone = profile("resnet8", "alone", 1, count_batch=2, saved_batch=4, time_steps=0, spatial=8)
    recipe = profile("resnet8", "recipe", 2, count_batch=2, time_steps=0, spatial=8)
    assert alone.total_kernels == 83 and recipe.total_kernels == 162
    # 7 BatchNorms: one native call each instead of vmap's normalisation + mul + add. Every
    # conv weight and BatchNorm weight/bias is a column range of the flat [N, P] parameter
    # storage (modelbatch._flat): one copy each to the layout with N merged into channels.
    from modelbatch.bench.workloads import ResNet8

    merged = sum(
        1
        for m in ResNet8().modules()
        if isinstance(m, (torch.nn.Conv2d, torch.nn.BatchNorm2d))
        for _ in m.parameters(recurse=False)
    )
    assert merged == 27
    forward = mb.kernels["forward"]
    assert forward <= alone.kernels["forward"] + 2 + merged < recipe.kernels["forward"]
    # Those copies are what conv saves for backward (one model's weights, 0.3 MiB: nothing
    # at batch 128 where activations are 78 MiB per model, visible at this tiny size).
    weights_mib = sum(p.numel() * 4 for p in ResNet8().parameters()) / 2**20
    assert mb.saved_mib_per_model <= 1.05 * alone.saved_mib_per_model + weights_mib


def test_report_command_prints_the_table(capsys: pytest.CaptureFixture[str]) -> None:
    assert (
        main(
            [
                "--arch",
                "mlp",
                "--models",
                "1",
                "--count-batch",
                "2",
                "--time-steps",
                "1",
                "--saved-batch",
                "0",
                "--threads",
                str(torch.get_num_threads()),
            ]
        )
        == 0
    )
    out = capsys.readouterr().out
    assert "| mlp | modelbatch | 1 |" in out and "| mlp | alone | 1 | 27 |" in out
    assert format_table([]).count("\n") == 1
