"""Merges at memory speed: dense merges of T task vectors, layer by layer in float32, against this
machine's copy bandwidth measured in the same run.

Task vectors: T random float32 tensors per parameter of the embedded all-MiniLM-L6-v2 (every
parameter, 22.7M entries, 91 MB per vector), as full fine-tuning or `merge` produce them. A
merge streams over the parameters one at a time (`merging.merge_dense` per parameter, as
`continual-lora merge` and the merge strategies call it) and writes one merged vector.

Bandwidth: a merge has to read T vectors and write one, so its useful traffic is (T + 1) × the
vector's bytes; its bandwidth is that over its time. The reference is `dst.copy_(src)` of a 256
MiB buffer (read + write: 2 × its bytes over its time), the best of 5, in the same process.
Also timed: the previous stack-based implementations (`torch.stack` of all T, weight, reduce),
kept here to show what streaming changed, and TIES and DARE, which are not memory-bound (a
top-k per delta; a random draw per entry).

Memory: each merge once more under `PeakTensorMemory` (tensor_memory.py): the peak bytes its
tensors held beyond the T inputs, against the merged vector's size and the largest parameter's.

    python benchmarks/merge_speed.py             # T = 2, 4, 8; writes RESULTS.md
    python benchmarks/merge_speed.py --tasks 2 --reps 2 --no-write
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from step_time import cpu_model, write_section  # noqa: E402
from tensor_memory import PeakTensorMemory  # noqa: E402

from continual_lora import merging  # noqa: E402

RESULTS = Path(__file__).parent / "results"
RESULTS_MD = Path(__file__).parent / "RESULTS.md"
TARGET = 0.5  # of the copy bandwidth


def model_shapes() -> dict[str, torch.Size]:
    from transformers import AutoModel

    from continual_lora.families.common import resolve_model_path

    model = AutoModel.from_pretrained(resolve_model_path("embedded:all-MiniLM-L6-v2"))
    return {name: p.shape for name, p in model.named_parameters()}


def task_vectors(shapes: dict[str, torch.Size], T: int, seed: int = 0) -> list[dict]:
    generator = torch.Generator().manual_seed(seed)
    return [{name: torch.randn(shape, generator=generator) for name, shape in shapes.items()}
            for _ in range(T)]


def copy_bandwidth(reps: int = 5, mib: int = 256, fresh: bool = False) -> float:
    """Bytes per second of `dst.copy_(src)` (read + write), best of `reps`; with `fresh`, of
    `src.clone()`, whose destination is new memory the OS must first map (as a merge's output
    is)."""
    src = torch.ones(mib * 2**18)
    dst = torch.empty_like(src)
    dst.copy_(src)  # touch it once: a warm destination
    best = float("inf")
    for _ in range(reps):
        start = time.perf_counter()
        copy = src.clone() if fresh else dst.copy_(src)
        best = min(best, time.perf_counter() - start)
        del copy
    return 2 * src.numel() * 4 / best


# -- the stack-based implementations these replaced (for the before/after numbers) -------------


def stacked_task_arithmetic(deltas, weights=None):
    stack = torch.stack([d.float() for d in deltas])
    w = merging._weights(weights, len(deltas))
    return (stack * w.view(-1, *([1] * (stack.dim() - 1)))).sum(0)


def stacked_magmax(deltas, weights=None):
    stack = torch.stack([d.float() for d in deltas])
    w = merging._weights(weights, len(deltas))
    stack = stack * w.view(-1, *([1] * (stack.dim() - 1)))
    return stack.gather(0, stack.abs().argmax(0, keepdim=True)).squeeze(0)


def methods() -> dict:
    generator = torch.Generator().manual_seed(0)
    return {
        "task_arithmetic": lambda d: merging.merge_dense("task_arithmetic", d),
        "magmax": lambda d: merging.merge_dense("magmax", d),
        "task_arithmetic (stacked, before)": stacked_task_arithmetic,
        "magmax (stacked, before)": stacked_magmax,
        "ties (density 0.2)": lambda d: merging.merge_dense("ties", d, density=0.2),
        "dare_linear (drop 0.5)": lambda d: merging.merge_dense(
            "dare_linear", d, drop_rate=0.5, generator=generator),
    }


def merge_all(fn, vectors: list[dict]) -> dict:
    """Merge parameter by parameter: only one parameter's work is alive at a time."""
    return {name: fn([v[name] for v in vectors]) for name in vectors[0]}


def measure(T: int, shapes, reps: int, copy_bps: float) -> list[dict]:
    vectors = task_vectors(shapes, T)
    vector_bytes = sum(t.numel() * 4 for t in vectors[0].values())
    largest = max(t.numel() * 4 for t in vectors[0].values())
    rows = []
    for name, fn in methods().items():
        merge_all(fn, vectors)  # warm-up
        best = float("inf")
        for _ in range(reps):
            start = time.perf_counter()
            merge_all(fn, vectors)
            best = min(best, time.perf_counter() - start)
        with PeakTensorMemory() as tracker:
            merged = merge_all(fn, vectors)
        del merged
        bandwidth = (T + 1) * vector_bytes / best
        rows.append({"T": T, "method": name, "seconds": best, "gb_per_s": bandwidth / 1e9,
                     "of_copy": bandwidth / copy_bps, "peak_mib": tracker.peak / 2**20,
                     "beyond_output_mib": (tracker.peak - vector_bytes) / 2**20,
                     "vector_mib": vector_bytes / 2**20, "largest_parameter_mib": largest / 2**20})
        print(f"  T={T} {name}: {best:.3f} s, {bandwidth / 1e9:.2f} GB/s "
              f"({bandwidth / copy_bps:.0%} of copy), peak {tracker.peak / 2**20:.0f} MiB",
              flush=True)
    return rows


def table(rows: list[dict], copy_bps: float) -> str:
    lines = ["| T | method | time (s) | GB/s ((T+1) vectors moved) | of copy bandwidth | ≥ 50% | "
             "peak tensor memory (MiB) | beyond the merged vector (MiB) |",
             "|---:|---|---:|---:|---:|:-:|---:|---:|"]
    for r in rows:
        memory_bound = r["method"] in ("task_arithmetic", "magmax")
        met = ("yes" if r["of_copy"] >= TARGET else "**no**") if memory_bound else "n/a"
        lines.append(f"| {r['T']} | {r['method']} | {r['seconds']:.3f} | {r['gb_per_s']:.2f} | "
                     f"{r['of_copy']:.0%} | {met} | {r['peak_mib']:.0f} | "
                     f"{r['beyond_output_mib']:.0f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tasks", default="2,4,8", help="values of T, comma-separated")
    p.add_argument("--reps", type=int, default=3, help="timed repetitions (best is kept)")
    p.add_argument("--no-write", action="store_true")
    args = p.parse_args(argv)
    start = time.perf_counter()
    shapes = model_shapes()
    copy_bps = copy_bandwidth()
    clone_bps = copy_bandwidth(fresh=True)
    print(f"copy bandwidth {copy_bps / 1e9:.2f} GB/s (read + write; into new memory "
          f"{clone_bps / 1e9:.2f}), {torch.get_num_threads()} torch threads", flush=True)
    rows = []
    for T in [int(t) for t in args.tasks.split(",")]:
        rows += measure(T, shapes, args.reps, copy_bps)
    text = table(rows, copy_bps)
    print(text)
    if args.no_write:
        return 0
    elapsed = time.perf_counter() - start
    command = shlex.join(["python", *sys.argv])
    env = {"date": datetime.now(UTC).isoformat(timespec="seconds"), "command": command,
           "machine": f"{cpu_model()}, {os.cpu_count()} logical CPUs",
           "torch": torch.__version__, "torch_threads": torch.get_num_threads(),
           "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "(unset)"),
           "copy_gb_per_s": copy_bps / 1e9, "clone_gb_per_s": clone_bps / 1e9,
           "wall_seconds": elapsed}
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "merge_speed.json").write_text(json.dumps({"environment": env, "rows": rows},
                                                         indent=2) + "\n")
    vector_mib = rows[0]["vector_mib"]
    largest = rows[0]["largest_parameter_mib"]
    section = [
        "## Merges at memory speed: dense merges of T task vectors against copy bandwidth", "",
        f"Measured {env['date']} by `{command}` (from the repository root, OMP_NUM_THREADS "
        f"{env['OMP_NUM_THREADS']}); how it measures: the script's docstring.", "",
        f"Copy bandwidth in the same run: {copy_bps / 1e9:.2f} GB/s (`dst.copy_(src)` of 256 MiB, "
        f"read + write, best of 5); into new memory (`src.clone()`, whose pages the OS maps on "
        f"first touch, as it does a merge's output): {clone_bps / 1e9:.2f} GB/s. The "
        "percentages are of the first.", "", text, "",
        f"- machine: {env['machine']}; torch {env['torch']}, {env['torch_threads']} threads",
        f"- task vectors: every parameter of the embedded all-MiniLM-L6-v2, {vector_mib:.0f} MiB "
        f"each in float32; largest parameter {largest:.0f} MiB (the word embeddings)",
        "- GB/s counts the least traffic a merge can have, (T + 1) vectors; the target (≥ 50% "
        "of copy bandwidth) applies to the memory-bound methods, task arithmetic and MagMax",
        "- peak tensor memory: beyond the T inputs; the merged vector itself is part of it",
        f"- wall time {elapsed:.0f} s; raw numbers `results/merge_speed.json`"]
    write_section(RESULTS_MD, "merge_speed", "\n".join(section))
    print(f"wrote {RESULTS_MD} (section merge_speed)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
