"""How each strategy's step time and storage grow with the number of tasks T: O-LoRA's penalty
and `moe`'s mixture grow with T; merge-based strategies should not.

For T = 2, 4, 8, 16 and each strategy, a case is the strategy after T − 1 earlier tasks (built
through its own hooks, one real training step each, as in step_time.py), then the timed task
(the T-th). Step time: the median of the timed steps, side by side and interleaved as in
step_time.py, and its ratio to `naive` at the same T. Storage: after the T-th task, what the
run folder keeps for its last stage, the files `export_adapter` writes (the adapter a user
loads; merge_reinit's exact concatenation has rank T·r) and the heads.

    python benchmarks/scaling.py                     # writes RESULTS.md (section scaling)
    python benchmarks/scaling.py --tasks 2,4 --strategies naive,olora --reps 2 --no-write
"""

from __future__ import annotations

import argparse
import contextlib
import json
import shlex
import statistics
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

import torch
from accelerate import Accelerator

sys.path.insert(0, str(Path(__file__).parent))
from step_time import (  # noqa: E402
    RESULTS,
    RESULTS_MD,
    Case,
    cpu_model,
    measure,
    prepare,
    write_section,
)

STRATEGIES = {"naive": {}, "replay": {"buffer_size": 16}, "lwf": {}, "olora": {},
              "merge_reinit": {}, "magmax": {}, "moe": {}}


def storage_bytes(prepared) -> tuple[int, int]:
    """(adapter bytes, heads bytes) of the last stage, as the run folder would keep them."""
    from continual_lora.runner import score_row

    strategy, ctx = prepared.strategy, prepared.ctx
    strategy.after_task(ctx)
    # as the runner does before saving a stage (moe saves its router's scores with it)
    score_row(prepared.family, prepared.tasks, None, prepared.task.index,
              prepared.cfg.train.eval_batch_size, strategy, ctx)
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp)
        (out / "adapter").mkdir()
        strategy.export_adapter(ctx, out / "adapter")
        prepared.family.save_task_parts(out)
        adapter = sum(f.stat().st_size for f in (out / "adapter").rglob("*") if f.is_file())
        heads = sum(f.stat().st_size for f in out.glob("heads.*"))
    return adapter, heads


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tasks", default="2,4,8,16")
    p.add_argument("--strategies", default=",".join(STRATEGIES))
    p.add_argument("--model", default="embedded:all-MiniLM-L6-v2")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--warmup-reps", type=int, default=1)
    p.add_argument("--no-write", action="store_true")
    args = p.parse_args(argv)
    start = time.perf_counter()
    torch.manual_seed(0)
    accelerator = Accelerator(cpu=not torch.cuda.is_available())
    names = args.strategies.split(",")
    rows = []
    for T in [int(t) for t in args.tasks.split(",")]:
        cases = [Case(f"{name}-T{T}", name, T - 1, STRATEGIES[name]) for name in names]
        print(f"T = {T}: preparing {', '.join(c.key for c in cases)}", flush=True)
        prepared = [prepare(c, args, accelerator) for c in cases]
        measure(prepared, accelerator, args)
        naive = next((c for c in prepared if c.case.strategy == "naive"), None)
        for c in prepared:
            step = statistics.median(statistics.median(t) for t in c.times)
            ratio = None
            if naive is not None:
                ratio = statistics.median(
                    statistics.median(a) / statistics.median(b)
                    for a, b in zip(c.times, naive.times, strict=True))
            adapter, heads = storage_bytes(c)
            rows.append({"T": T, "strategy": c.case.strategy, "step_ms": 1000 * step,
                         "ratio_to_naive": ratio, "adapter_bytes": adapter,
                         "heads_bytes": heads})
            print(f"  {c.case.key}: step {1000 * step:.0f} ms, ratio {ratio:.3f}, adapter "
                  f"{adapter / 2**20:.2f} MiB", flush=True)
        del prepared
    text = table(rows, names)
    print(text)
    if not args.no_write:
        write(rows, text, args, time.perf_counter() - start)
    return 0


def table(rows: list[dict], names: list[str]) -> str:
    Ts = sorted({r["T"] for r in rows})
    cell = {(r["strategy"], r["T"]): r for r in rows}
    head = ("| strategy | " + " | ".join(f"step ms (× naive) at T={T}" for T in Ts) + " | "
            + " | ".join(f"adapter MiB at T={T}" for T in Ts) + " |")
    lines = [head, "|---|" + "---:|" * (2 * len(Ts))]
    for name in names:
        steps = []
        for T in Ts:
            r = cell[(name, T)]
            ratio = "" if r["ratio_to_naive"] is None else f" ({r['ratio_to_naive']:.2f})"
            steps.append(f"{r['step_ms']:.0f}{ratio}")
        sizes = [f"{cell[(name, T)]['adapter_bytes'] / 2**20:.2f}" for T in Ts]
        lines.append(f"| {name} | " + " | ".join(steps) + " | " + " | ".join(sizes) + " |")
    return "\n".join(lines)


def write(rows: list[dict], text: str, args, elapsed: float) -> None:
    command = shlex.join(["python", *sys.argv])
    date = datetime.now(UTC).isoformat(timespec="seconds")
    RESULTS.mkdir(exist_ok=True)
    with contextlib.suppress(OSError):
        (RESULTS / "scaling.json").write_text(json.dumps(
            {"date": date, "command": command, "rows": rows}, indent=2) + "\n")
    section = [
        "## Scaling with the number of tasks: step time and storage after T tasks", "",
        f"Measured {date} by `{command}` (from the repository root); how it measures: the "
        "script's docstring.", "", text, "",
        f"- machine: {cpu_model()}; torch {torch.__version__}, {torch.get_num_threads()} threads",
        f"- the demo's settings (embedded all-MiniLM-L6-v2, batch {args.batch_size}, LoRA r=8 "
        "on query/key/value/dense); step time: median of "
        f"{args.steps} timed steps, median over {args.reps} interleaved repetitions; in "
        "brackets, the ratio to naive at the same T",
        "- adapter MiB: the last stage's `adapter/` folder as a run writes it (PEFT files; "
        "moe: every task's adapter); heads are not counted (`results/scaling.json` has them)",
        f"- wall time {elapsed:.0f} s"]
    write_section(RESULTS_MD, "scaling", "\n".join(section))
    print(f"wrote {RESULTS_MD} (section scaling)")


if __name__ == "__main__":
    raise SystemExit(main())
