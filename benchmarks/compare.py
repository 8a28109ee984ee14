"""Turns a saved ``pytest benchmarks --benchmark-json RUN.json`` into a Markdown table; compares two runs.

    python benchmarks/compare.py RUN.json              # one run: ms, GB/s, TFLOP/s, ratios to eager/compile, peak MiB
    python benchmarks/compare.py BASE.json NEW.json    # two runs: NEW against BASE, benchmark by benchmark

Ratios are speed-ups within one run (``eager median / this median``; above 1 is faster);
GB/s and TFLOP/s come from the bytes and FLOPs each benchmark records in ``extra_info``;
*peak MiB* is the memory peak it records (``peak_memory_bytes``), where it does.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

KEY_FIELDS = ("op", "shape", "dtype", "pass")
IMPL_ORDER = {"copy": 0, "eager": 1, "compile": 2, "sdpa": 3, "reference": 4, "cpp": 5, "triton": 6, "cuda": 7}


def load(path: str | Path) -> dict:
    """The pytest-benchmark JSON at ``path`` (raises ``ValueError`` if it is not one)."""
    data = json.loads(Path(path).read_text(encoding="utf-8"))
    if not isinstance(data, dict) or "benchmarks" not in data:
        raise ValueError(f"{path} is not a pytest-benchmark JSON file (no 'benchmarks' list)")
    return data


def rows(data: dict) -> list[dict]:
    """One row per benchmark: labels, median seconds and derived rates."""
    out = []
    for bench in data["benchmarks"]:
        info = bench.get("extra_info", {})
        median = bench["stats"]["median"] / info.get("calls_per_round", 1)
        row = {field: str(info.get(field, "")) for field in KEY_FIELDS}
        row["impl"] = str(info.get("impl", bench["name"]))
        row["name"] = bench["name"]
        row["median_s"] = median
        row["gbps"] = info["bytes"] / median / 1e9 if info.get("bytes") else None
        row["tflops"] = info["flops"] / median / 1e12 if info.get("flops") else None
        row["peak_mib"] = info["peak_memory_bytes"] / 2**20 if "peak_memory_bytes" in info else None
        out.append(row)
    by_group: dict[tuple, dict[str, float]] = {}
    for row in out:
        by_group.setdefault(tuple(row[f] for f in KEY_FIELDS), {})[row["impl"]] = row["median_s"]
    for row in out:
        group = by_group[tuple(row[f] for f in KEY_FIELDS)]
        for baseline in ("eager", "compile"):
            row[f"vs_{baseline}"] = group[baseline] / row["median_s"] if baseline in group else None
    out.sort(key=lambda r: (r["op"], r["shape"], r["dtype"], r["pass"], IMPL_ORDER.get(r["impl"], 9), r["name"]))
    return out


def _num(value: float | None, fmt: str) -> str:
    return "" if value is None else format(value, fmt)


def describe(data: dict) -> str:
    machine = data.get("machine_info", {})
    cpu = machine.get("cpu", {}).get("brand_raw", "")
    extra = {b.get("extra_info", {}).get("device") for b in data["benchmarks"]} - {None}
    return (
        f"{data.get('datetime', '?')}; {machine.get('node', '?')}; {cpu}; "
        f"python {machine.get('python_version', '?')}; devices {', '.join(sorted(extra)) or '?'}"
    )


def table(data: dict) -> str:
    """Markdown table of one run."""
    lines = [
        f"Run: {describe(data)}",
        "",
        "| op | shape | dtype | pass | impl | median ms | GB/s | TFLOP/s | x eager | x compile | peak MiB |",
        "| --- | --- | --- | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in rows(data):
        lines.append(
            f"| {r['op']} | {r['shape']} | {r['dtype']} | {r['pass']} | {r['impl']} | {1e3 * r['median_s']:.4g} | "
            f"{_num(r['gbps'], '.3g')} | {_num(r['tflops'], '.3g')} | {_num(r['vs_eager'], '.2f')} | "
            f"{_num(r['vs_compile'], '.2f')} | {_num(r['peak_mib'], '.4g')} |"
        )
    return "\n".join(lines) + "\n"


def compare(base: dict, new: dict) -> str:
    """Markdown table of ``new`` against ``base``, for benchmarks present in both."""

    def index(data):
        return {(*(r[f] for f in KEY_FIELDS), r["impl"], r["name"]): r for r in rows(data)}

    a, b = index(base), index(new)
    lines = [
        f"Base: {describe(base)}",
        f"New: {describe(new)}",
        "",
        "| op | shape | dtype | pass | impl | base ms | new ms | new / base |",
        "| --- | --- | --- | --- | --- | ---: | ---: | ---: |",
    ]
    for key in [k for k in b if k in a]:
        old, cur = a[key], b[key]
        lines.append(
            f"| {cur['op']} | {cur['shape']} | {cur['dtype']} | {cur['pass']} | {cur['impl']} | "
            f"{1e3 * old['median_s']:.4g} | {1e3 * cur['median_s']:.4g} | {cur['median_s'] / old['median_s']:.2f} |"
        )
    only = sorted(set(a) ^ set(b))
    if only:
        lines += ["", "In one run only: " + ", ".join(k[-1] for k in only)]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("runs", nargs="+", metavar="RUN.json", help="one run, or BASE and NEW")
    parser.add_argument("--output", "-o", default=None, help="write the Markdown here instead of stdout")
    args = parser.parse_args(argv)
    if len(args.runs) > 2:
        parser.error("give one run (a table) or two runs (BASE NEW, a comparison)")
    try:
        runs = [load(path) for path in args.runs]
    except (OSError, ValueError) as exc:
        print(f"compare.py: {exc}", file=sys.stderr)
        return 2
    text = table(runs[0]) if len(runs) == 1 else compare(*runs)
    if args.output:
        Path(args.output).write_text(text, encoding="utf-8")
    else:
        sys.stdout.write(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
