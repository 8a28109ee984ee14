"""Does float16 feature storage change top-1? Heads trained on float32, float16 and float32 + noise.

``python -m benchmarks.cache_dtype --out runs/cache_dtype`` writes the walk-through's
synthetic videos (``examples/synthetic_motion.py``: 4 directions, 512 training and 128
test videos), caches their random-weight tiny-CLIP features in float32, and for each seed
trains the motion head three times, from the float32 features, from the same features
rounded to float16 (what the default cache stores) and from float32 features perturbed by
random noise of float16's rounding size (relative 2^-12); each head is then scored on the
float32 and on the float16 test features. Prints one JSON line per seed and a summary.
Not part of the test suite (about 2 minutes per seed on 2 CPU cores).
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

import open_clip
import torch

from mpfast import create_model_and_transforms
from mpfast.data import ClipTransform, SamplingConfig, VideoDataset, read_class_names, read_list
from mpfast.data.synthetic import make_synthetic_dataset
from mpfast.engine import FeatureCache, FeatureDataset, TrainConfig, Trainer, build_cache, evaluate

TINY_CONFIG = Path(__file__).resolve().parents[1] / "tests" / "configs" / "mpfast-tiny.json"


def _model(seed: int):
    torch.manual_seed(seed)
    return create_model_and_transforms("mpfast-tiny", None, num_frames=8)[0]


def run_seed(seed: int, data: Path, cache_dir: Path, epochs: int) -> dict:
    names = read_class_names(data / "classes.csv")
    model = _model(seed)

    def features(split: str) -> FeatureCache:
        dataset = VideoDataset(read_list(data / f"{split}.txt"), data, SamplingConfig(8), ClipTransform(32, flip=False),
                               num_clips=2)
        cache = build_cache(model, dataset, cache_dir, "mpfast-tiny", dtype="float32")
        return cache

    train, test = features("train"), features("test")
    values = train.features[:]
    noise = (torch.rand(values.shape, generator=torch.Generator().manual_seed(100 + seed)) - 0.5) * 2 ** -11
    variants = {"float32": values, "float16": values.half().float(), "float32+noise": values * (1 + noise)}
    tests = {name: FeatureCache.from_tensors(f, test.labels) for name, f in
             (("float32", test.features[:]), ("float16", test.features[:].half().float()))}
    row = {"seed": seed}
    for name, train_values in variants.items():
        head = _model(seed)
        config = TrainConfig(epochs=epochs, batch_size=16, lr=3e-3, warmup_steps=20, seed=seed, progress=False,
                             log_every=0)
        Trainer(head, names, FeatureDataset(FeatureCache.from_tensors(train_values, train.labels), train=True,
                                            seed=seed), config).fit()
        for test_name, test_cache in tests.items():
            row[f"train {name} / test {test_name}"] = evaluate(head, FeatureDataset(test_cache), names)[0]["top1"]
    return row


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.cache_dtype", description=__doc__.split("\n")[0])
    parser.add_argument("--out", default="runs/cache_dtype", help="working folder (videos, caches)")
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--epochs", type=int, default=30)
    args = parser.parse_args(argv)
    open_clip.add_model_config(TINY_CONFIG)
    out = Path(args.out)
    if not (out / "data" / "classes.csv").exists():
        make_synthetic_dataset(out / "data", 128, 32, size=32, num_frames=16, seed=0)
    rows = []
    for seed in range(args.seeds):
        rows.append(run_seed(seed, out / "data", out / "cache", args.epochs))
        print(json.dumps(rows[-1]), flush=True)
    for key in (k for k in rows[0] if k != "seed"):
        values = [row[key] for row in rows]
        spread = f" sd {statistics.stdev(values):.4f}" if len(values) > 1 else ""
        print(f"{key:32s} mean {statistics.mean(values):.4f}{spread}  {values}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
