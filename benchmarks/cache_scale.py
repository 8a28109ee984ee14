"""Kinetics-sized feature cache: open it, train the head one epoch from it, watch memory.

``python -m benchmarks.cache_scale`` writes a synthetic cache (by default 300,000 videos x
8 frames x 512, float16: 2.5 GB) with the real shard writer, then, each in a fresh
process, opens it (every shard's checksums and values checked) and trains the head for
one epoch from it: once reading rows from the shard files as the batches need them
(``disk``, what ``mpfast train --cache-dir`` does) and once with the whole cache read
into RAM first (``ram``). It reports, for each, the time to open, the epoch's throughput
(videos/s) and how much the process's resident memory grew beyond what it held before
opening the cache (peak, ``VmHWM``), and deletes the cache unless ``--keep``.
``--max-growth-gb`` (default 1) makes the run fail when the ``disk`` epoch grows by more.
``--loader-only`` reads the epoch's batches without training: what the cache alone costs.

The head is MotionCLIP's on a CLIP with D=512 whose towers are tiny (only the class
embeddings come from the text tower, once), so the step costs what the head costs;
``--classes`` sets C (the head's cost grows with C). Not part of the test suite;
``tests/test_engine_cache.py`` runs a scaled-down check of the memory bound.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
import time

import torch

from mpfast.engine.cache import CACHE_VERSION, SHARD_SIZE, cache_key, write_meta
from mpfast.engine.shards import shard_name, write_shard

# An open_clip config with D=512 and tiny towers: the head is the whole cost of a step.
CLIP_CONFIG = {"embed_dim": 512,
               "vision_cfg": {"image_size": 32, "layers": 1, "width": 64, "head_width": 32, "patch_size": 16},
               "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 1}}
MODEL_NAME = "mpfast-bench-d512"


def write_synthetic_cache(cache_dir: str, videos: int, *, views: int = 1, frames: int = 8, dim: int = 512,
                          dtype: str = "float16", classes: int = 400, seed: int = 0,
                          shard_size: int = SHARD_SIZE) -> str:
    """Writes a complete cache of random features with the library's shard writer; returns its folder."""
    description = {"version": CACHE_VERSION, "synthetic": {"videos": videos, "views": views, "frames": frames,
                                                           "dim": dim, "classes": classes, "seed": seed},
                   "storage": {"dtype": dtype, "shard_size": shard_size}}
    key = cache_key(description)
    folder = os.path.join(cache_dir, key)
    if os.path.isfile(os.path.join(folder, "meta.json")):
        return folder  # kept from an earlier run (--keep)
    os.makedirs(folder, exist_ok=True)
    meta = {"version": CACHE_VERSION, "key": key, "inputs": description, "count": videos, "views": views,
            "num_frames": frames, "dim": dim, "dtype": dtype, "shard_size": shard_size,
            "row_shape": [views, frames, dim]}
    generator = torch.Generator().manual_seed(seed)
    started = time.perf_counter()
    for number in range(math.ceil(videos / shard_size)):
        start, stop = number * shard_size, min((number + 1) * shard_size, videos)
        features = torch.randn(stop - start, views, frames, dim, generator=generator).to(getattr(torch, dtype))
        indices = torch.arange(start, stop)
        write_shard(os.path.join(folder, shard_name(number)), key=key, number=number, start=start, stop=stop,
                    features=features, indices=indices, labels=indices % classes, failed={}, short=0)
    write_meta(folder, meta, time.perf_counter() - started)
    return folder


def _status_bytes(field: str) -> int:
    with open("/proc/self/status", encoding="ascii") as handle:
        for line in handle:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise KeyError(field)


def _reset_peak() -> bool:
    """Resets VmHWM to the current resident size (Linux >= 4.0)."""
    try:
        with open("/proc/self/clear_refs", "w", encoding="ascii") as handle:
            handle.write("5")
        return True
    except OSError:
        return False


def run_epoch(folder: str, mode: str, classes: int, batch_size: int, threads: int, device: str,
              loader_only: bool = False) -> dict:
    """In this process: open the cache (``mode`` "disk" or "ram"), train one epoch (or read its batches), measure."""
    import open_clip

    from torch.utils.data import DataLoader

    from mpfast import create_model_and_transforms
    from mpfast.engine import FeatureCache, FeatureDataset, TrainConfig, Trainer
    from mpfast.engine.cache import collate_features

    torch.set_num_threads(threads)
    with tempfile.TemporaryDirectory() as configs:
        path = os.path.join(configs, f"{MODEL_NAME}.json")
        with open(path, "w", encoding="utf-8") as handle:
            json.dump(CLIP_CONFIG, handle)
        open_clip.add_model_config(path)
        torch.manual_seed(0)
        model = create_model_and_transforms(MODEL_NAME, None, num_frames=8, device=device)[0]
    names = [f"action {i}" for i in range(classes)]
    model.encode_classes(names)  # the text tower runs once, before the measurement
    before = _status_bytes("VmRSS")
    peak_reset = _reset_peak()
    started = time.perf_counter()
    cache = FeatureCache(folder)
    if mode == "ram":
        cache = cache.in_memory()
    opened = time.perf_counter() - started
    after_open = _status_bytes("VmRSS")
    dataset = FeatureDataset(cache, train=True)
    started = time.perf_counter()
    if loader_only:  # the batches of an epoch in random order, as training reads them, and nothing else
        generator = torch.Generator().manual_seed(0)
        for _ in DataLoader(dataset, batch_size=batch_size, shuffle=True, generator=generator,
                            collate_fn=collate_features):
            pass
    else:
        Trainer(model, names, dataset, TrainConfig(epochs=1, batch_size=batch_size, progress=False, log_every=0),
                device=device).fit()
    seconds = time.perf_counter() - started
    peak = _status_bytes("VmHWM")
    return {"mode": mode, "work": "batches only" if loader_only else "training", "device": device,
            "videos": len(cache), "open_s": round(opened, 2), "epoch_s": round(seconds, 2),
            "videos_per_s": round(len(cache) / seconds, 1), "rss_before_gb": round(before / 2**30, 3),
            "growth_after_open_gb": round((after_open - before) / 2**30, 3),
            "peak_growth_gb": round((peak - before) / 2**30, 3) if peak_reset else None,
            "end_growth_gb": round((_status_bytes("VmRSS") - before) / 2**30, 3)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.cache_scale", description=__doc__.split("\n")[0])
    parser.add_argument("--videos", type=int, default=300_000)
    parser.add_argument("--frames", type=int, default=8)
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--classes", type=int, default=16, help="classes C of the head (its cost grows with C)")
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--threads", type=int, default=min(4, os.cpu_count() or 1), help="torch threads")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                        help="where the head trains")
    parser.add_argument("--dir", default=".", help="where the cache is written (needs the space: see the docstring)")
    parser.add_argument("--modes", default="disk,ram", help="comma-separated: disk, ram")
    parser.add_argument("--loader-only", action="store_true",
                        help="read the epoch's batches without training: the cost of the cache alone")
    parser.add_argument("--keep", action="store_true",
                        help="keep the cache (reused by a later run with the same sizes)")
    parser.add_argument("--max-growth-gb", type=float, default=1.0, help="fail when the disk epoch grows RSS by more")
    parser.add_argument("--run", choices=("disk", "ram"), help=argparse.SUPPRESS)
    parser.add_argument("--folder", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.run:
        print(json.dumps(run_epoch(args.folder, args.run, args.classes, args.batch_size, args.threads, args.device,
                                   args.loader_only)))
        return 0

    size = args.videos * args.frames * args.dim * 2
    free = shutil.disk_usage(args.dir).free
    if free < 1.2 * size:
        raise SystemExit(f"error: the cache needs {size / 1e9:.1f} GB, {args.dir!r} has {free / 1e9:.1f} GB free")
    cache_dir = os.path.join(args.dir, "cache-scale-benchmark")
    started = time.perf_counter()
    folder = write_synthetic_cache(cache_dir, args.videos, frames=args.frames, dim=args.dim, classes=args.classes)
    written = time.perf_counter() - started
    print(f"cache: {folder} ({size / 1e9:.2f} GB of features, written in {written:.1f} s)", file=sys.stderr)
    results = []
    try:
        for mode in args.modes.split(","):
            command = [sys.executable, "-m", "benchmarks.cache_scale", "--run", mode, "--folder", folder,
                       "--classes", str(args.classes), "--batch-size", str(args.batch_size),
                       "--threads", str(args.threads), "--device", args.device]
            command += ["--loader-only"] if args.loader_only else []
            done = subprocess.run(command, capture_output=True, text=True, cwd=os.path.dirname(os.path.dirname(
                os.path.abspath(__file__))))
            if done.returncode:
                raise SystemExit(f"error: the {mode} run failed:\n{done.stderr[-3000:]}")
            results.append(json.loads(done.stdout.strip().splitlines()[-1]))
            print(json.dumps(results[-1]), file=sys.stderr)
    finally:
        if not args.keep:
            shutil.rmtree(cache_dir, ignore_errors=True)
    print(f"| cache | epoch of | open (s) | epoch (s) | videos/s | RSS growth, peak (GB) | after open (GB) |\n"
          f"| --- | --- | ---: | ---: | ---: | ---: | ---: |")
    for r in results:
        print(f"| {r['mode']} | {r['work']} | {r['open_s']} | {r['epoch_s']} | {r['videos_per_s']} | "
              f"{r['peak_growth_gb']} | {r['growth_after_open_gb']} |")
    print(json.dumps({"videos": args.videos, "bytes": size, "write_s": round(written, 1), "runs": results,
                      "machine": {"cpus": os.cpu_count(), "torch": torch.__version__, "threads": args.threads,
                                  "device": (torch.cuda.get_device_name() if args.device.startswith("cuda")
                                             else "cpu")}}))
    disk = [r for r in results if r["mode"] == "disk"]
    if disk and (disk[0]["peak_growth_gb"] or disk[0]["end_growth_gb"]) > args.max_growth_gb:
        print(f"error: resident memory grew by more than {args.max_growth_gb} GB", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
