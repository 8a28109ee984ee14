"""``mpfast report``: parameters, FLOPs (two counters), speed and memory of a MotionCLIP.

Everything is measured on random weights (FLOPs and speed do not depend on the weight
values) on the current device and dtype. Timing: warm-up calls first, then timed calls
that alternate between the bare CLIP frame encoder and the whole MotionCLIP, so both see
the same machine load; CUDA calls are timed with CUDA events; medians are reported with
their spread (slowest and fastest timed call), and the machine's load average is
recorded beside them. The plots use linear axes from zero.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import logging
import os
import platform
import resource
import statistics
import time
from pathlib import Path
from typing import Callable, Sequence

import torch
from torch import Tensor

from ..data.transforms import preprocess_config
from . import counting

logger = logging.getLogger("mpfast.profiling")

SWEEP_CLASSES = (51, 101, 400)  # HMDB-51, UCF-101, Kinetics-400
SWEEP_PROMPTS = (8, 56)  # K; with T frames the text side attends over L = K + T keys
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclasses.dataclass
class ReportOptions:
    """What ``mpfast report`` measures.

    Attributes:
        model: open_clip model name (register a custom config first with
            :func:`mpfast.model.add_model_config`, or pass ``model_configs``).
        frames: frame counts T to measure.
        batches: batch sizes to time; ``None``: (1, 2) on CPU, (1, 8, 32) on CUDA.
        classes: number of classes C for the head (random class features).
        device: ``"cpu"``, ``"cuda"``...; ``None``: CUDA if available.
        dtype: ``"float32"``, ``"bfloat16"`` or ``"float16"``.
        compile: time ``torch.compile``-d callables.
        warmup: untimed calls per measurement; ``None``: 1 on CPU, 5 on CUDA.
        iterations: timed calls per measurement; ``None``: 3 on CPU, 20 on CUDA.
        sweep: count the head over C, T and K (cheap; skipped for a quick report).
        model_configs: open_clip config files to register before creating ``model``.
    """

    model: str = "ViT-B-16"
    frames: Sequence[int] = (8,)
    batches: Sequence[int] | None = None
    classes: int = 400
    device: str | None = None
    dtype: str = "float32"
    compile: bool = False
    warmup: int | None = None
    iterations: int | None = None
    sweep: bool = True
    model_configs: Sequence[str] = ()

    def __post_init__(self) -> None:
        def positive_ints(name: str, values) -> tuple[int, ...]:
            values = tuple(values)
            if not values or any(isinstance(v, bool) or not isinstance(v, int) or v < 1 for v in values):
                raise ValueError(f"{name} must be positive ints, got {values!r}")
            return values

        self.frames = positive_ints("frames", self.frames)
        if self.batches is not None:
            self.batches = positive_ints("batches", self.batches)
        positive_ints("classes", (self.classes,))
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {self.dtype!r}")
        for name in ("warmup", "iterations"):
            value = getattr(self, name)
            if value is not None and (
                isinstance(value, bool) or not isinstance(value, int) or value < (0 if name == "warmup" else 1)
            ):
                raise ValueError(f"{name} must be an int >= {0 if name == 'warmup' else 1}, got {value!r}")


# ------------------------------------------------------------------ timing


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _time_call(fn: Callable[[], object], device: torch.device) -> float:
    """Seconds one call takes (CUDA events on CUDA, wall clock after a sync elsewhere)."""
    if device.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / 1e3
    _synchronize(device)
    begin = time.perf_counter()
    fn()
    _synchronize(device)
    return time.perf_counter() - begin


def _quantile(values: Sequence[float], q: float) -> float:
    ordered = sorted(values)
    position = q * (len(ordered) - 1)
    low = int(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


def _summary(times: Sequence[float], batch: int) -> dict:
    median = statistics.median(times)
    return {
        "latency_ms_p50": 1e3 * median,
        "latency_ms_p90": 1e3 * _quantile(times, 0.9),
        "latency_ms_min": 1e3 * min(times),
        "latency_ms_max": 1e3 * max(times),
        "videos_per_s": batch / median,
        "videos_per_s_min": batch / max(times),  # the slowest timed call
        "videos_per_s_max": batch / min(times),  # the fastest timed call
        "samples": len(times),
    }


def _load_average() -> list[float] | None:
    """1, 5 and 15-minute load averages (None where the OS has none): other work on the machine."""
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except (AttributeError, OSError):
        return None


def _peak_memory_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    # ru_maxrss is in KiB on Linux (bytes on macOS): the whole process's peak resident memory.
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(rss if platform.system() == "Darwin" else rss * 1024)


# ------------------------------------------------------------------ the report


def _device_description(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return f"{cpu}, {os.cpu_count()} logical cores, {torch.get_num_threads()} torch threads"


def _default_device(device: str | None) -> torch.device:
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def _g(value: float) -> float:
    return value / 1e9


def _flops_entry(count: counting.FlopCount, depth: int | None = 2) -> dict:
    entry = count.to_dict(module_depth=depth)
    entry["gflops_fvcore_style"] = _g(count.fvcore)
    entry["gflops_true"] = _g(count.true)
    return entry


def _with_head(model, tokenizer, **changes):
    """``model`` itself, or a MotionCLIP on the same frozen CLIP whose head config differs by ``changes``."""
    from mpfast.model import MotionCLIP

    if all(getattr(model.config, k) == v for k, v in changes.items()):
        return model
    p = model.motion.gate
    return MotionCLIP(model.clip, dataclasses.replace(model.config, **changes), tokenizer).to(p.device, p.dtype)


def build_report(options: ReportOptions, progress: bool = True) -> dict:
    """Measures a MotionCLIP as ``options`` say; returns the report as a JSON-able dict."""
    from tqdm.auto import tqdm

    import mpfast
    from mpfast.model import add_model_config, create_model_and_transforms

    for path in options.model_configs:
        add_model_config(path)
    device = _default_device(options.device)
    on_cuda = device.type == "cuda"
    batches = options.batches or ((1, 8, 32) if on_cuda else (1, 2))
    warmup = options.warmup if options.warmup is not None else (5 if on_cuda else 1)
    iterations = options.iterations if options.iterations is not None else (20 if on_cuda else 3)
    dtype = DTYPES[options.dtype]
    started = time.perf_counter()
    load_at_start = _load_average()

    count_steps = (
        2 * len(options.frames)
        + 1
        + (len(SWEEP_CLASSES) * len(options.frames) * len(SWEEP_PROMPTS) if options.sweep else 0)
    )
    time_steps = len(options.frames) * len(batches) * (warmup + iterations)
    bar = tqdm(total=count_steps + time_steps, desc="mpfast report", disable=not progress, unit="step", leave=False)

    bar.set_postfix_str(f"creating {options.model}")
    model, _, _, tokenizer = create_model_and_transforms(options.model, None, options.frames[0], device=device)
    model = model.to(dtype).eval()
    params = counting.count_parameters(model, depth=2)

    # FLOPs: per video (frame encoder and head), per class list (text encoder).
    flops: dict = {"frame_encoder": {}, "head": {}, "text_encoder": {}}
    head_share: dict = {}
    one_frame = None
    for frames in options.frames:
        bar.set_postfix_str(f"counting frame encoder, T={frames}")
        if one_frame is None:
            one_frame = counting.frame_encoder_flops(model, 1)
        encoder = one_frame.scaled(frames)  # every frame is encoded on its own: exactly T x one frame
        bar.update()
        flops["frame_encoder"][str(frames)] = _flops_entry(encoder, depth=3)
        bar.set_postfix_str(f"counting head, T={frames}, C={options.classes}")
        head_model = _with_head(model, tokenizer, num_frames=frames)
        cost = counting.head_cost(head_model, frames, options.classes)
        bar.update()
        flops["head"][str(frames)] = {
            "per_video": _flops_entry(cost.per_video),
            "per_call": _flops_entry(cost.per_call),
            "batch_1": _flops_entry(cost.at_batch_one),
        }
        head_share[str(frames)] = {
            "per_video": cost.per_video.fvcore / encoder.fvcore,
            "batch_1": cost.at_batch_one.fvcore / encoder.fvcore,
        }
    bar.set_postfix_str("counting text encoder (one prompt)")
    per_class = counting.text_encoder_flops_per_class(model)
    bar.update()
    prompts_per_list = options.classes * len(model.config.templates)
    flops["text_encoder"] = {
        "per_prompt": _flops_entry(per_class),
        "per_class_list": {
            "classes": options.classes,
            "templates": len(model.config.templates),
            "gflops_fvcore_style": _g(per_class.fvcore * prompts_per_list),
            "gflops_true": _g(per_class.true * prompts_per_list),
        },
    }

    sweep = []
    if options.sweep:
        for frames in options.frames:
            for prompts in SWEEP_PROMPTS:
                head_model = _with_head(model, tokenizer, num_frames=frames, num_prompts=prompts)
                for classes in SWEEP_CLASSES:
                    bar.set_postfix_str(f"head sweep T={frames} K={prompts} C={classes}")
                    cost = counting.head_cost(head_model, frames, classes)
                    bar.update()
                    sweep.append(
                        {
                            "frames": frames,
                            "prompts": prompts,
                            "keys": frames + prompts,
                            "classes": classes,
                            "per_video_gflops_fvcore_style": _g(cost.per_video.fvcore),
                            "per_call_gflops_fvcore_style": _g(cost.per_call.fvcore),
                            "per_video_gflops_true": _g(cost.per_video.true),
                        }
                    )

    # Speed: bare CLIP frame encoder vs the whole MotionCLIP, interleaved.
    size = preprocess_config(model.clip)[0]
    class_features = torch.nn.functional.normalize(torch.randn(options.classes, model.dim, device=device), dim=-1).to(
        dtype
    )
    timing = []
    for frames in options.frames:
        head_model = _with_head(model, tokenizer, num_frames=frames).eval()

        def bare(video: Tensor) -> Tensor:
            return model.encode_frames(video)

        def full(video: Tensor, head_model=head_model) -> Tensor:
            return head_model.forward_features(head_model.encode_frames(video), class_features)

        bare_fn, full_fn = (torch.compile(bare), torch.compile(full)) if options.compile else (bare, full)
        for batch in batches:
            bar.set_postfix_str(f"timing T={frames} B={batch}")
            video = torch.randn(batch, frames, 3, size, size, device=device, dtype=dtype)
            times: dict[str, list[float]] = {"clip_frame_encoder": [], "motionclip": []}
            peaks = {}
            with torch.inference_mode():
                for step in range(warmup + iterations):
                    for name, fn in (("clip_frame_encoder", bare_fn), ("motionclip", full_fn)):
                        if on_cuda:
                            torch.cuda.reset_peak_memory_stats(device)
                        elapsed = _time_call(lambda: fn(video), device)
                        peaks[name] = max(peaks.get(name, 0), _peak_memory_bytes(device))
                        if step >= warmup:
                            times[name].append(elapsed)
                    bar.update()
            row = {"frames": frames, "batch": batch}
            for name, values in times.items():
                row[name] = {**_summary(values, batch), "peak_memory_bytes": peaks[name]}
            row["head_overhead"] = row["motionclip"]["latency_ms_p50"] / row["clip_frame_encoder"]["latency_ms_p50"] - 1
            timing.append(row)
    bar.close()

    return {
        "mpfast_version": mpfast.__version__,
        "torch_version": torch.__version__,
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "model": options.model,
        "weights": "random (no pretrained weights: FLOPs, parameters and speed do not depend on weight values)",
        "device": str(device),
        "device_description": _device_description(device),
        "load_average": {"start": load_at_start, "end": _load_average()},
        "dtype": options.dtype,
        "compile": options.compile,
        "ops_backend": mpfast.ops.requested_backend(),
        "available_backends": {k: v is None for k, v in mpfast.ops.available_backends(device.type).items()},
        "classes": options.classes,
        "frames": list(options.frames),
        "batches": list(batches),
        "warmup": warmup,
        "iterations": iterations,
        "peak_memory_note": (
            "torch.cuda.max_memory_allocated per measurement"
            if on_cuda
            else "process peak resident memory (ru_maxrss), cumulative over the run"
        ),
        "parameters": params.to_dict(),
        "flops": flops,
        "head_share_of_frame_encoder": head_share,
        "head_sweep": sweep,
        "timing": timing,
        "wall_time_s": time.perf_counter() - started,
    }


# ------------------------------------------------------------------ output


def _fmt_int(n: float) -> str:
    return f"{int(n):,}"


def rate_text(entry: dict) -> str:
    """``median [slowest, fastest]`` videos/s of a timing entry."""
    return f"{entry['videos_per_s']:.3f} [{entry['videos_per_s_min']:.3f}, {entry['videos_per_s_max']:.3f}]"


def load_text(report: dict, when: str) -> str:
    load = (report.get("load_average") or {}).get(when)
    return ", ".join(f"{x:.2f}" for x in load) if load else "unknown"


def render_markdown(report: dict) -> str:
    """The report as Markdown."""
    p = report["parameters"]
    lines = [
        f"# mpfast report: {report['model']}",
        "",
        f"{report['date']}; mpfast {report['mpfast_version']}, torch {report['torch_version']}; "
        f"device {report['device']} ({report['device_description']}); dtype {report['dtype']}"
        f"{'; torch.compile' if report['compile'] else ''}; mpfast ops backend {report['ops_backend']} "
        f"(available: {', '.join(k for k, ok in report['available_backends'].items() if ok)}).",
        f"Weights: {report['weights']}.",
        "",
        "## Parameters",
        "",
        "| module | total | trainable |",
        "| --- | ---: | ---: |",
        f"| **all** | {_fmt_int(p['total'])} | {_fmt_int(p['trainable'])} |",
    ]
    for name, n in p["by_module"].items():
        lines.append(f"| {name} | {_fmt_int(n['total'])} | {_fmt_int(n['trainable'])} |")
    lines += [
        "",
        "## FLOPs per video",
        "",
        "Two counters: fvcore (FlopCountAnalysis) and PyTorch's FlopCounterMode. The frame encoder is counted "
        "on one frame and multiplied by T (frames are encoded independently, so this is exact). *fvcore-style*: "
        "one multiply-add = one FLOP (what papers print). *true*: a multiply-add = two FLOPs. Each counter's "
        "own convention is exact; the other column is converted. Head *per video* = what each extra video adds; "
        "*per call* = class-side work paid once per forward whatever the batch size (cached per class list at "
        "inference: a call with a cached list pays *per video* alone); *batch 1* = both.",
        "",
        "| part | T | GFLOPs fvcore-style (fvcore / FlopCounterMode) | true GFLOPs (fvcore / FlopCounterMode) "
        "| counters differ |",
        "| --- | ---: | ---: | ---: | ---: |",
    ]

    def row(label: str, frames, entry: dict) -> str:
        fs, tr = entry["fvcore_style"], entry["true_flops"]
        return (
            f"| {label} | {frames} | {_g(fs['fvcore']):.4f} / {_g(fs['flop_counter_mode']):.4f} | "
            f"{_g(tr['fvcore']):.4f} / {_g(tr['flop_counter_mode']):.4f} | {100 * entry['disagreement']:.3f} % |"
        )

    for frames, entry in report["flops"]["frame_encoder"].items():
        lines.append(row("frozen CLIP frame encoder", frames, entry))
        head = report["flops"]["head"][frames]
        lines.append(row(f"head, per video (C={report['classes']})", frames, head["per_video"]))
        lines.append(row(f"head, per call (C={report['classes']})", frames, head["per_call"]))
        lines.append(row(f"head, batch 1 (C={report['classes']})", frames, head["batch_1"]))
    text = report["flops"]["text_encoder"]
    lines.append(row("text encoder, per prompt", "-", text["per_prompt"]))
    lists = text["per_class_list"]
    lines += [
        "",
        f"Per class list (text encoder, once per list, cached by `MotionCLIP.encode_classes`): {lists['classes']} "
        f"classes x {lists['templates']} template(s) = {lists['gflops_fvcore_style']:.1f} GFLOPs fvcore-style "
        f"({lists['gflops_true']:.1f} true).",
        "",
        "Head cost relative to the frame encoder (fvcore-style): "
        + "; ".join(
            f"T={t}: {100 * s['per_video']:.3f} % per video, {100 * s['batch_1']:.3f} % at batch 1"
            for t, s in report["head_share_of_frame_encoder"].items()
        ),
        "",
    ]
    first = next(iter(report["flops"]["frame_encoder"]))
    for label, entry in (
        ("frame encoder", report["flops"]["frame_encoder"][first]),
        ("head per video", report["flops"]["head"][first]["per_video"]),
    ):
        lines += [
            f"### By op: {label}, T={first}",
            "",
            "| counter | op | GFLOPs (counter's convention) |",
            "| --- | --- | ---: |",
        ]
        for counter, key in (("fvcore", "fvcore_by_op"), ("FlopCounterMode", "flop_counter_mode_by_op")):
            for op, v in entry[key].items():
                if v:
                    lines.append(f"| {counter} | {op} | {_g(v):.4f} |")
        lines += [
            "",
            f"### By module: {label}, T={first}",
            "",
            "A module entered through a method other than its forward has no FlopCounterMode row (-).",
            "",
            "| module | fvcore-style (fvcore) | true (FlopCounterMode) |",
            "| --- | ---: | ---: |",
        ]
        names = sorted(set(entry["fvcore_by_module"]) | set(entry["flop_counter_mode_by_module"]))
        for name in names:
            cells = [
                f"{_g(d[name]):.4f}" if name in d else "-"
                for d in (entry["fvcore_by_module"], entry["flop_counter_mode_by_module"])
            ]
            lines.append(f"| {name or '(all)'} | {cells[0]} | {cells[1]} |")
        skipped = entry["skipped_ops"]
        lines += [
            "",
            "Ops not counted (element-wise, by convention): "
            + "; ".join(
                f"{c}: " + (", ".join(f"{op} x{n}" for op, n in ops.items()) or "none") for c, ops in skipped.items()
            ),
            "",
        ]
    if report["head_sweep"]:
        lines += [
            "## How the head grows with classes C, frames T and keys L = K + T",
            "",
            "| T | K | L | C | per video GFLOPs (fvcore-style) | per call GFLOPs (fvcore-style) |",
            "| ---: | ---: | ---: | ---: | ---: | ---: |",
        ]
        for s in report["head_sweep"]:
            lines.append(
                f"| {s['frames']} | {s['prompts']} | {s['keys']} | {s['classes']} | "
                f"{s['per_video_gflops_fvcore_style']:.4f} | {s['per_call_gflops_fvcore_style']:.4f} |"
            )
        lines += [
            "",
            "Per video, in multiply-adds, with the class_logits op (H heads, H·L < D): C·(2·L·D + (H·L)²) "
            "(scores, g and the quadratic form of each (video, class) pair) + L·D² + (H·L)²·D (values folded "
            "through the output projection, their Gram matrix) + 2·L·D² (video keys/values) + 3·C·D (video ← text "
            "attention, logits) + O(T·D²/2) (motion block); per call: 4·C·D² (class-side query, key and value "
            "projections, the op's class fold). The unfused head paid C·D² + 2·C·L·D per video instead of the "
            "first two terms.",
            "",
        ]
    lines += [
        "## Speed",
        "",
        f"{report['warmup']} warm-up and {report['iterations']} timed calls per row, bare encoder and MotionCLIP "
        f"alternating; videos/s of the median call, in brackets the slowest and the fastest call; latency per "
        f"batch; peak memory: {report['peak_memory_note']}. Load average (1, 5, 15 min) at the start "
        f"{load_text(report, 'start')}, at the end {load_text(report, 'end')}: other work on the machine "
        f"slows every row.",
        "",
        "| T | batch | CLIP frame encoder videos/s | MotionCLIP videos/s | MotionCLIP p50 ms | p90 ms | "
        "head overhead | peak memory MiB |",
        "| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in report["timing"]:
        b, m = r["clip_frame_encoder"], r["motionclip"]
        lines.append(
            f"| {r['frames']} | {r['batch']} | {rate_text(b)} | {rate_text(m)} | "
            f"{m['latency_ms_p50']:.1f} | {m['latency_ms_p90']:.1f} | {100 * r['head_overhead']:+.1f} % | "
            f"{m['peak_memory_bytes'] / 2**20:.0f} |"
        )
    lines += ["", f"Report wall time: {report['wall_time_s']:.0f} s.", ""]
    return "\n".join(lines)


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def throughput_figure(report: dict):
    """Grouped bars from zero: videos/s of the bare CLIP frame encoder and of MotionCLIP for each
    (T, batch size), with error bars from the slowest to the fastest timed call."""
    plt = _pyplot()
    rows = report["timing"]
    fig, ax = plt.subplots(figsize=(max(6.0, 1.3 * len(rows) + 2), 4.2))
    width = 0.38
    for offset, (key, label, colour) in enumerate(
        (("clip_frame_encoder", "bare CLIP frame encoder", "#9db4c0"), ("motionclip", "MotionCLIP", "#1f5f8b"))
    ):
        x = [i + (offset - 0.5) * width for i in range(len(rows))]
        rates = [r[key]["videos_per_s"] for r in rows]
        low = [r[key]["videos_per_s"] - r[key]["videos_per_s_min"] for r in rows]
        high = [r[key]["videos_per_s_max"] - r[key]["videos_per_s"] for r in rows]
        ax.bar(x, rates, width, label=label, color=colour, yerr=[low, high], capsize=4, ecolor="black")
        for xi, rate in zip(x, rates):
            ax.annotate(f"{rate:.3g}", (xi, rate), xytext=(0, 2), textcoords="offset points", ha="center",
                        va="bottom", fontsize=7)
    ax.set_xticks(range(len(rows)), [f"batch {r['batch']}\nT={r['frames']}" for r in rows])
    ax.set_ylim(bottom=0)
    ax.set_ylabel("videos / s (median call)")
    ax.set_title(
        f"{report['model']} on {report['device']} ({report['dtype']}): throughput\n"
        f"error bars: slowest to fastest of {report['iterations']} timed calls",
        fontsize=10,
    )
    ax.grid(True, axis="y", alpha=0.3)
    ax.legend(fontsize=8, loc="upper left")
    fig.tight_layout()
    return fig


def flops_breakdown(report: dict) -> list[tuple[str, dict[str, float]]]:
    """Where a video's GFLOPs (fvcore-style) go, as stacked-bar rows ``(label, {part: GFLOPs})``.

    Parts are keys of :data:`FLOP_PARTS`. For each T two rows: one video classified alone
    with a class list not yet encoded (what ``mpfast classify`` pays: frame encoder, head
    per video, head per call and the text encoder over the class list), and one video of
    a large batch with the class list cached (frame encoder and head per video only).
    """
    lists = report["flops"]["text_encoder"]["per_class_list"]
    rows = []
    for frames, encoder in report["flops"]["frame_encoder"].items():
        head = report["flops"]["head"][frames]
        per_video = {"encoder": encoder["gflops_fvcore_style"], "head/video": head["per_video"]["gflops_fvcore_style"]}
        alone = {**per_video, "head/call": head["per_call"]["gflops_fvcore_style"],
                 "text/list": lists["gflops_fvcore_style"]}
        rows.append((f"T={frames}: one video,\nnew class list", alone))
        rows.append((f"T={frames}: per video of a\nlarge batch, list cached", per_video))
    return rows


FLOP_PARTS = {  # short name: (legend, colour)
    "encoder": ("frozen CLIP frame encoder (T frames)", "#1f5f8b"),
    "head/video": ("head, per video", "#e4572e"),
    "head/call": ("head, per call: class-side projections", "#f3a712"),
    "text/list": ("text encoder, once per class list (cached)", "#76b041"),
}


def flops_figure(report: dict):
    """Stacked horizontal bars on a linear axis from zero (see :func:`flops_breakdown`)."""
    plt = _pyplot()
    rows = flops_breakdown(report)
    fig, ax = plt.subplots(figsize=(9, 1.4 + 1.2 * len(rows)))
    positions = range(len(rows))
    left = [0.0] * len(rows)
    for part, (legend, colour) in FLOP_PARTS.items():
        values = [row.get(part, 0.0) for _, row in rows]
        ax.barh(positions, values, height=0.55, left=left, color=colour, label=legend)
        left = [a + b for a, b in zip(left, values)]
    for i, (_, row) in enumerate(rows):
        total = sum(row.values())
        ax.annotate(f" {total:.4g}", (total, i), va="center", fontsize=8)
        shares = ",  ".join(f"{part} {100 * value / total:.2f} %" for part, value in row.items())
        ax.annotate(shares, (0, i + 0.28), xytext=(2, 0), textcoords="offset points", fontsize=7, va="top")
    ax.set_yticks(list(positions), [label for label, _ in rows], fontsize=8)
    ax.set_xlim(0, max(left) * 1.15)
    ax.invert_yaxis()
    ax.set_xlabel("GFLOPs, fvcore-style (one multiply-add = one FLOP); linear axis from zero")
    ax.set_title(f"{report['model']}, C={report['classes']} classes: where a video's FLOPs go", fontsize=10)
    ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    return fig


def write_report(report: dict, out_dir: str | os.PathLike) -> list[Path]:
    """Writes report.json, report.md, throughput.png and flops_per_video.png into ``out_dir``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = [out / "report.json", out / "report.md", out / "throughput.png", out / "flops_per_video.png"]
    paths[0].write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    paths[1].write_text(render_markdown(report), encoding="utf-8")
    plt = _pyplot()
    for figure, path in ((throughput_figure(report), paths[2]), (flops_figure(report), paths[3])):
        figure.savefig(path, dpi=100)
        plt.close(figure)
    return paths
