"""Budgets: trainable parameters and head GFLOPs of the standard configurations stay under their ceilings.

The ceilings live in mpfast/profiling/budgets.json; ``python -m mpfast.profiling.budgets``
prints the measured values beside them (``--write`` records them).
"""

import math

import pytest

from mpfast.profiling import budgets

BUDGETS = budgets.load()
CONFIGS = [(m, t, c) for m in budgets.MODELS for t in budgets.FRAMES for c in budgets.CLASSES]
_measured: dict[str, dict] = {}


def measured(model_name: str) -> dict[str, dict]:
    """Measures each model once per test session (random weights; the head on random features)."""
    if model_name not in _measured:
        _measured[model_name] = budgets.measure_model(model_name)
    return _measured[model_name]


def test_every_standard_configuration_has_a_budget():
    for model, frames, classes in CONFIGS:
        entry = BUDGETS["configs"].get(budgets.config_key(model, frames, classes))
        assert entry is not None, f"no budget for {model} T={frames} C={classes}"
        assert set(entry["ceilings"]) == set(budgets.METRICS)


def test_ceilings_are_no_looser_than_the_design():
    # Design: the head of ViT-B/16 at 8 frames has <= 3 M trainable parameters and costs
    # <= 0.3 % of the frozen backbone's FLOPs per video with 400 classes.
    ceilings = BUDGETS["configs"][budgets.config_key("ViT-B-16", 8, 400)]["ceilings"]
    backbone = BUDGETS["backbones"]["ViT-B-16"]["T8"]["gflops_fvcore_style"]
    assert ceilings["trainable_params"] <= 3_000_000
    assert ceilings["head_gflops_per_video"] <= 0.003 * backbone * (1 + 1e-9)


@pytest.mark.parametrize("model,frames,classes", CONFIGS, ids=[budgets.config_key(*c) for c in CONFIGS])
def test_within_budget(model, frames, classes):
    key = budgets.config_key(model, frames, classes)
    values = measured(model)[key]
    problems = budgets.violations(BUDGETS, {key: values})
    assert not problems, "over budget:\n" + "\n".join(problems)


@pytest.mark.parametrize("model", budgets.MODELS)
def test_recorded_values_are_current(model):
    # The file records what the head costs; a change that moves a value by more than 1 %
    # must update it (python -m mpfast.profiling.budgets --write) so reviewers see the change.
    stale = []
    for key, values in measured(model).items():
        recorded = BUDGETS["configs"][key]["measured"]
        for metric, value in values.items():
            if not math.isclose(value, recorded[metric], rel_tol=0.01):
                stale.append(f"{key} {metric}: measured {value:.6g}, recorded {recorded[metric]:.6g}")
    assert not stale, "budgets.json is out of date (python -m mpfast.profiling.budgets --write):\n" + "\n".join(stale)


def test_violations_show_the_numbers():
    key = budgets.config_key("ViT-B-16", 8, 400)
    over = {key: {"trainable_params": 3_100_000, "head_gflops_per_video": 0.01, "head_gflops_per_call": 0.1}}
    (problem,) = budgets.violations(BUDGETS, over)
    assert "trainable_params = 3.1e+06 exceeds the ceiling 3e+06" in problem
