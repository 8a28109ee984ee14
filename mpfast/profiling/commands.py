"""``mpfast report``: parameters, FLOPs, throughput and memory of a MotionCLIP."""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

from ..cli import nonnegative_int, positive_int
from .report import DTYPES, load_text, rate_text

logger = logging.getLogger("mpfast.profiling")


def _summary(report: dict) -> str:
    p = report["parameters"]
    lines = [
        f"mpfast report: {report['model']} ({report['weights'].split(' (')[0]} weights), device {report['device']} "
        f"({report['device_description']}), dtype {report['dtype']}",
        f"parameters: {p['total']:,} total, {p['trainable']:,} trainable",
        "GFLOPs per video: fvcore-style (one multiply-add = one FLOP) | true FLOPs (FlopCounterMode)",
    ]
    for frames, encoder in report["flops"]["frame_encoder"].items():
        head = report["flops"]["head"][frames]
        share = report["head_share_of_frame_encoder"][frames]
        rows = [
            (f"T={frames}: frozen CLIP frame encoder", encoder, ""),
            (f"  head per video (C={report['classes']})", head["per_video"], f"{100 * share['per_video']:.3f} %"),
            ("  head at batch 1", head["batch_1"], f"{100 * share['batch_1']:.3f} %"),
        ]
        for label, entry, ratio in rows:
            fvcore, true = entry["gflops_fvcore_style"], entry["gflops_true"]
            lines.append(f"  {label:<34} {fvcore:10.4f} | {true:10.4f}  {ratio + ' of the encoder' if ratio else ''}")
    lists = report["flops"]["text_encoder"]["per_class_list"]
    label = f"per class list ({lists['classes']} classes x {lists['templates']} template(s), text encoder)"
    lines.append(f"  {label}: {lists['gflops_fvcore_style']:.1f} | {lists['gflops_true']:.1f}")
    lines.append(
        f"throughput (videos/s of the median of {report['iterations']} calls [slowest, fastest]; latency p50/p90 ms "
        f"per batch; head overhead vs bare CLIP frame encoder; load average {load_text(report, 'start')}):"
    )
    for r in report["timing"]:
        b, m = r["clip_frame_encoder"], r["motionclip"]
        lines.append(
            f"  T={r['frames']:>3} B={r['batch']:>3}  CLIP {rate_text(b)}  MotionCLIP {rate_text(m)}  "
            f"p50 {m['latency_ms_p50']:9.1f}  p90 {m['latency_ms_p90']:9.1f}  "
            f"overhead {100 * r['head_overhead']:+6.1f} %  peak {m['peak_memory_bytes'] / 2**20:,.0f} MiB"
        )
    lines.append(f"wall time {report['wall_time_s']:.0f} s")
    return "\n".join(lines)


def run_report(args: argparse.Namespace) -> int:
    from .report import ReportOptions, build_report, write_report

    options = ReportOptions(
        model=args.model,
        model_configs=tuple(args.model_config),
        frames=args.frames,
        batches=args.batch,
        classes=args.classes,
        device=args.device,
        dtype=args.dtype,
        compile=args.compile,
        warmup=args.warmup,
        iterations=args.iterations,
        sweep=not args.no_sweep,
    )
    report = build_report(options, progress=not args.no_progress)
    print(_summary(report))
    if args.json is not None:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
        print(f"wrote {args.json}")
    if args.out is not None:
        for path in write_report(report, args.out):
            print(f"wrote {path}")
    return 0


def add_commands(subparsers) -> None:
    """Adds ``mpfast report``."""
    parser = subparsers.add_parser(
        "report",
        help="parameters, FLOPs, throughput and memory of a MotionCLIP (random weights)",
        description="Measures a MotionCLIP with random weights (FLOPs and speed do not depend on weight values): "
        "parameters, FLOPs per video from two counters (fvcore and torch FlopCounterMode, both conventions), "
        "what the head adds per video and per class list, and throughput/latency/peak memory against the "
        "bare CLIP frame encoder on this device.",
    )
    parser.add_argument("--model", default="ViT-B-16", help="open_clip model name, or mpfast-tiny")
    parser.add_argument(
        "--model-config",
        action="append",
        default=[],
        metavar="JSON",
        help="register a custom open_clip model config file first (repeatable); its file name is the model name "
        "(default: none)",
    )
    parser.add_argument("--frames", type=positive_int, nargs="+", default=[8], help="frame counts T")
    parser.add_argument(
        "--batch", type=positive_int, nargs="+", default=None,
        help="batch sizes to time (default: 1 2 on CPU, 1 8 32 on CUDA)",
    )
    parser.add_argument("--classes", type=positive_int, default=400, help="number of classes C (random class features)")
    parser.add_argument("--device", default=None, help="cpu, cuda, cuda:1... (default: cuda if available)")
    parser.add_argument(
        "--dtype", default="float32", choices=sorted(DTYPES), help="dtype of the whole model (CLIP and head)"
    )
    parser.add_argument("--compile", action="store_true", help="time torch.compile-d callables")
    parser.add_argument(
        "--warmup", type=nonnegative_int, default=None, help="untimed calls per measurement (default: 1 CPU, 5 CUDA)"
    )
    parser.add_argument(
        "--iterations", type=positive_int, default=None,
        help="timed calls per measurement; the plots' error bars span them (default: 3 CPU, 20 CUDA)",
    )
    parser.add_argument("--no-sweep", action="store_true", help="skip counting the head over C, T and K")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.add_argument("--json", default=None, metavar="PATH", help="write the report as JSON here (default: none)")
    parser.add_argument(
        "--out",
        default=None,
        metavar="DIR",
        help="write report.json, report.md, throughput.png and flops_per_video.png here (default: none)",
    )
    parser.set_defaults(func=run_report)
