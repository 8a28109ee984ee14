"""Parameter and FLOP budgets of the standard configurations, kept in ``budgets.json``.

Each standard configuration (ViT-B/32 and ViT-B/16; 8 and 16 frames; C = 51, 101, 400
classes) has ceilings on the trainable parameters and on the head's GFLOPs (fvcore
convention: one multiply-add = one FLOP), and the values measured when the ceilings were
last reviewed. ``tests/test_budgets.py`` fails when a change crosses a ceiling.

Counting is cheap: the head runs on random ``[B,T,D]`` frame features and ``[C,D]``
class features; the frozen backbone's GFLOPs are stored (checked against a fresh count
in ``tests/test_profiling.py``).

``python -m mpfast.profiling.budgets`` prints the measured values next to the ceilings;
``--write`` stores them as the new ``measured`` values (ceilings are edited by hand).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
from pathlib import Path

from . import counting

logger = logging.getLogger("mpfast.profiling")

BUDGETS_PATH = Path(__file__).with_name("budgets.json")
MODELS = ("ViT-B-32", "ViT-B-16")
FRAMES = (8, 16)
CLASSES = (51, 101, 400)
METRICS = ("trainable_params", "head_gflops_per_video", "head_gflops_per_call")


def config_key(model: str, frames: int, classes: int) -> str:
    return f"{model}/T{frames}/C{classes}"


def load(path: str | Path = BUDGETS_PATH) -> dict:
    """The budgets file as a dict."""
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def measure_model(
    model_name: str, frames: tuple[int, ...] = FRAMES, classes: tuple[int, ...] = CLASSES
) -> dict[str, dict]:
    """Measures every budgeted quantity of ``model_name`` (random weights) for each T and C.

    Returns:
        ``{config_key: {metric: value}}`` with the metrics of :data:`METRICS` plus
        ``head_gflops_batch1``.
    """
    from mpfast.model import MotionCLIP, create_model_and_transforms

    base, _, _, tokenizer = create_model_and_transforms(model_name, None, frames[0])
    results = {}
    for num_frames in frames:
        model = (
            base
            if num_frames == frames[0]
            else MotionCLIP(base.clip, dataclasses.replace(base.config, num_frames=num_frames), tokenizer)
        )
        trainable = counting.count_parameters(model, depth=1).trainable
        for num_classes in classes:
            cost = counting.head_cost(model, num_frames, num_classes)
            for part in (cost.per_video, cost.per_call):
                part.check_agreement()
            results[config_key(model_name, num_frames, num_classes)] = {
                "trainable_params": trainable,
                "head_gflops_per_video": cost.per_video.fvcore / 1e9,
                "head_gflops_per_call": cost.per_call.fvcore / 1e9,
                "head_gflops_batch1": cost.at_batch_one.fvcore / 1e9,
            }
    return results


def violations(budgets: dict, measured: dict[str, dict]) -> list[str]:
    """Messages for each measured value above its ceiling (empty: all within budget)."""
    problems = []
    for key, values in sorted(measured.items()):
        entry = budgets["configs"].get(key)
        if entry is None:
            problems.append(f"{key}: no budget in {BUDGETS_PATH.name}")
            continue
        for metric, ceiling in entry["ceilings"].items():
            value = values[metric]
            if value > ceiling:
                recorded = entry.get("measured", {}).get(metric)
                problems.append(
                    f"{key}: {metric} = {value:.6g} exceeds the ceiling {ceiling:.6g} "
                    f"(recorded when the ceilings were set: {recorded:.6g})"
                )
    return problems


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m mpfast.profiling.budgets", description=__doc__.split("\n\n")[0])
    parser.add_argument("--write", action="store_true", help="store the measured values in budgets.json")
    args = parser.parse_args(argv)
    budgets = load()
    measured = {}
    for model in MODELS:
        measured.update(measure_model(model))
    print(f"{'configuration':<22} {'metric':<24} {'measured':>12} {'ceiling':>12}")
    for key, values in measured.items():
        ceilings = budgets["configs"].get(key, {}).get("ceilings", {})
        for metric, value in values.items():
            ceiling = ceilings.get(metric)
            print(f"{key:<22} {metric:<24} {value:>12.6g} {'' if ceiling is None else f'{ceiling:.6g}':>12}")
    problems = violations(budgets, measured)
    for problem in problems:
        print("OVER BUDGET:", problem)
    if args.write:
        for key, values in measured.items():
            budgets["configs"].setdefault(key, {"ceilings": {}})["measured"] = {
                **budgets["configs"].get(key, {}).get("measured", {}),
                **values,
            }
        BUDGETS_PATH.write_text(json.dumps(budgets, indent=2) + "\n", encoding="utf-8")
        print(f"wrote {BUDGETS_PATH}")
    return 1 if problems else 0


if __name__ == "__main__":
    raise SystemExit(main())
