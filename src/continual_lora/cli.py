"""The `continual-lora` command line: thin; it parses, builds configs and calls the library."""

from __future__ import annotations

import argparse
import errno
import json
import os
import sys
from importlib.resources import files
from pathlib import Path

from continual_lora import convert as convert_cli
from continual_lora.checkpoint import RunDirExists
from continual_lora.config import ConfigError, is_bench_config, load_bench_config, load_run_config
from continual_lora.lineage import LineageError
from continual_lora.report.page import write_report_or_warn
from continual_lora.resume import CheckpointError
from continual_lora.strategies.base import AdapterError
from continual_lora.trainer import TrainingError
from continual_lora.update import cli as update_cli
from continual_lora.update.budget import BudgetError

USER_ERRORS = (ConfigError, RunDirExists, TrainingError, AdapterError, BudgetError,
               CheckpointError, LineageError)


def _main_process() -> bool:
    """False in the non-main processes of `torchrun`/`accelerate launch` (they do not report)."""
    return os.environ.get("RANK", "0") == "0"


def _demo_config_path() -> Path:
    return Path(str(files("continual_lora") / "presets" / "demo.yaml"))


def cmd_demo(args: argparse.Namespace) -> int:

    overrides = [f"run.output_dir={args.out}"] if args.out else []
    if args.overwrite:
        overrides.append("run.overwrite=true")
    if args.quick:  # a smoke test of the whole path, not a measurement
        overrides += ["run.train.max_steps=3", "run.upstream.size=50"]
    cfg = load_bench_config(_demo_config_path(), overrides + args.overrides)
    print("continual-lora demo: naive, replay, merge_reinit and joint on 4 WordNet tasks, with "
          "the real all-MiniLM-L6-v2 encoder, offline.")
    return _bench(cfg)


def _bench(cfg, resume_dir: Path | None = None) -> int:
    from continual_lora.bench import comparison_rows, format_table, run_bench

    bench_dir, results = run_bench(cfg, bench_dir=resume_dir, resume=resume_dir is not None)
    if not _main_process():
        return 0
    print("\n" + format_table(comparison_rows(results)))
    if (bench_dir / "rounds.md").is_file():  # a causal LM's knowledge rounds
        print("\n" + (bench_dir / "rounds.md").read_text().split("\n\n")[0])
    print(f"\nbench folder: {bench_dir}  (comparison.md, comparison.csv, runs/)")
    write_report_or_warn(bench_dir)
    return 0


def _stored_config(args: argparse.Namespace, name: str, what: str) -> Path:
    """The config saved in the `--resume` folder. `--resume` takes no config file (overrides
    are allowed, and refused later if they change anything)."""
    if args.config and "=" in args.config:  # argparse took the first override for CONFIG
        args.overrides, args.config = [args.config, *args.overrides], None
    if args.config:
        raise ConfigError(f"--resume {args.resume} takes the config stored there; give no "
                          "config file")
    stored = Path(args.resume) / name
    if not stored.is_file():
        raise ConfigError(f"--resume {args.resume}: no {name} there, so no {what} was started "
                          f"in it; start one with `continual-lora {what} CONFIG`")
    return stored


def cmd_run(args: argparse.Namespace) -> int:
    from continual_lora.runner import run

    if args.resume:
        run_dir = Path(args.resume)
        stored = _stored_config(args, "config.yaml", "run")
        result = run(load_run_config(stored, args.overrides), run_dir=run_dir, resume=True)
    else:
        if not args.config:
            raise ConfigError("run needs a CONFIG file (or --resume RUN_DIR)")
        if is_bench_config(args.config):
            raise ConfigError(f"{args.config} is a bench config (it has `strategies`): use "
                              "`continual-lora bench`")
        cfg = load_run_config(args.config, args.overrides)
        result = run(cfg)
    if not _main_process():
        return 0
    m = result.metrics
    print(f"\nACC {m['acc']:.3f}  forgetting {m['forgetting']:.3f}  BWT {m['bwt']:.3f}  "
          f"FWT {m['fwt']:.3f}  upstream retention {m.get('upstream_retention', float('nan')):.3f}")
    print(f"run folder: {result.run_dir}")
    write_report_or_warn(result.run_dir)
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    if args.resume:
        stored = _stored_config(args, "bench.yaml", "bench")
        return _bench(load_bench_config(stored, args.overrides), Path(args.resume))
    if not args.config:
        raise ConfigError("bench needs a CONFIG file (or --resume BENCH_DIR)")
    return _bench(load_bench_config(args.config, args.overrides))


def cmd_eval(args: argparse.Namespace) -> int:
    from continual_lora.evaluate import evaluate_run, rows_match

    row, recorded, stage = evaluate_run(Path(args.run_dir), args.stage)
    print(f"stage {stage} reloaded with PeftModel.from_pretrained:")
    for name, score, saved in zip(_task_names(Path(args.run_dir)), row.scores, recorded,
                                  strict=True):
        print(f"  {name:<24} {score:.4f}  (recorded {saved:.4f})")
    if row.upstream == row.upstream:
        print(f"  {'upstream':<24} {row.upstream:.4f}")
    if rows_match(row, recorded):
        return 0
    export = _stage_export(Path(args.run_dir), stage)
    if export.get("kind") in APPROXIMATE_EXPORTS:
        # Not an error: this stage's adapter is a stated approximation of the scored model.
        print(f"note: this stage's adapter is {APPROXIMATE_EXPORTS[export['kind']]} "
              f"(stage.json: {json.dumps({k: export[k] for k in export if k != 'kind'})}), "
              "so its scores may differ from the recorded ones")
        return 0
    print("error: the reloaded adapter does not reproduce the recorded scores", file=sys.stderr)
    return 1


# Exports that do not reproduce the scored model exactly, and why (see each strategy's docstring).
APPROXIMATE_EXPORTS = {
    "peft_lora_svd": "a truncated SVD of the merged update (merge, magmax)",
    "peft_lora_mixture": "the newest task's adapter of a routed mixture (moe); the mixture "
                         "needs every adapter under adapter/task*/ and the router",
}


def _stage_export(run_dir: Path, stage: int) -> dict:
    from continual_lora.evaluate import stage_dirs

    stage_file = stage_dirs(run_dir)[stage - 1] / "stage.json"
    return json.loads(stage_file.read_text()).get("export", {}) if stage_file.is_file() else {}


def _task_names(run_dir: Path) -> list[str]:
    return json.loads((run_dir / "results.json").read_text())["tasks"]


def cmd_validate(args: argparse.Namespace) -> int:
    if is_bench_config(args.config):
        cfg = load_bench_config(args.config, args.overrides)
        print(f"{args.config}: valid bench config ({len(cfg.strategies)} strategies, "
              f"{len(cfg.run.tasks)} tasks)")
    else:
        cfg = load_run_config(args.config, args.overrides)
        print(f"{args.config}: valid run config ({cfg.strategy.name}, {len(cfg.tasks)} tasks)")
    return 0


def cmd_strategies(args: argparse.Namespace) -> int:
    from continual_lora.registry import get_strategy, strategy_names

    for name in strategy_names():
        cls = get_strategy(name)
        old = "needs old data" if cls.needs_old_data else "no old data"
        print(f"  {name:<14} {old:<15} {cls.summary}")
    return 0


def cmd_merge(args: argparse.Namespace) -> int:
    from continual_lora.adapter_files import MergeRequest, merge_adapter_folders

    req = MergeRequest(adapters=[Path(p) for p in args.adapters], out=Path(args.out),
                       method=args.method, weights=args.weights, density=args.density,
                       drop_rate=args.drop_rate, rank=args.rank, seed=args.seed,
                       overwrite=args.overwrite)
    info = merge_adapter_folders(req)
    err = info["relative_error"]
    how = "exact concatenation" if args.method == "cat" else "truncated SVD"
    print(f"merged {len(req.adapters)} adapters by {args.method} into {req.out} "
          f"(rank {info['rank']}, {how}, {err['modules']} modules)")
    print(f"relative reconstruction error ‖ΔW − BA‖/‖ΔW‖ per module: mean {err['mean']:.4g}, "
          f"max {err['max']:.4g} ({err['max_module']})")
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from continual_lora.report.forgetting import format_forgetting
    from continual_lora.report.page import build_report

    domains = {}
    for entry in args.domain or []:
        task, _, words = entry.partition("=")
        if not task or not words:
            raise ConfigError(f"--domain {entry!r}: write TASK=WORD[,WORD...], e.g. "
                              "--domain hoofed=ungulate")
        domains[task] = [w.strip() for w in words.split(",") if w.strip()]
    folder = Path(args.folder)
    if not folder.is_dir():
        raise ConfigError(f"{folder}: no such folder; give a run, bench or update folder")
    path = build_report(folder, args.top, domains, args.cumulative)
    # The per-class forgetting numbers the page drew, as text (classifier runs only).
    for numbers_file in sorted([*folder.glob("figures/forgetting.json"),
                                *folder.glob("runs/*/figures/forgetting.json")]):
        numbers = json.loads(numbers_file.read_text())
        print(f"{numbers_file.parent.parent}:\n{format_forgetting(numbers)}")
    print(f"report: {path}")
    return 0


def cmd_diagnose(args: argparse.Namespace) -> int:
    from continual_lora.diagnose.command import DiagnoseOptions, diagnose
    from continual_lora.diagnose.tables import terminal_text

    options = DiagnoseOptions(drift=not args.no_drift, out=Path(args.out) if args.out else None,
                              base=Path(args.base) if args.base else None,
                              cumulative=args.cumulative, batch_size=args.batch_size)
    outcome = diagnose([Path(p) for p in args.paths], options)
    print(terminal_text(outcome.kind, outcome.diagnosis))
    for path in outcome.written:
        print(f"wrote {path}")
    return 0


def cmd_inspect(args: argparse.Namespace) -> int:
    from continual_lora.inspect_adapter import format_report, inspect_adapter

    info = inspect_adapter(Path(args.adapter))
    print(json.dumps(info, indent=2) if args.json else format_report(info))
    return 0


def cmd_generate(args: argparse.Namespace) -> int:
    from continual_lora.generate import generate, load_for_generation

    if args.qa and args.chat:
        raise ConfigError("generate: give --qa or --chat, not both")
    loaded = load_for_generation(Path(args.adapter) if args.adapter else None, args.base,
                                 args.trust_remote_code)
    what = f"adapter {loaded.adapter}" if loaded.adapter else "no adapter"
    print(f"base {loaded.base}, {what}", file=sys.stderr)
    answers = generate(loaded, args.prompt, args.max_new_tokens, args.temperature, args.chat,
                       args.qa, args.seed)
    for prompt, answer in zip(args.prompt, answers, strict=True):
        print(f">>> {prompt}\n{answer}\n")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="continual-lora",
        description="Update models with LoRA adapters over a sequence of datasets without "
                    "forgetting, and measure what was kept and what was lost.")
    sub = parser.add_subparsers(dest="command", required=True)
    overrides_help = "dotted overrides, e.g. train.lr=1e-4 lora.r=4"

    p = sub.add_parser("demo", help="the embedded default bench, offline (about 4 min on 2 cores)")
    p.add_argument("--out", help="output folder (default: runs)")
    p.add_argument("--overwrite", action="store_true", help="replace an earlier demo folder")
    p.add_argument("--quick", action="store_true", help="3 steps per task: checks the path only")
    p.add_argument("overrides", nargs="*", help=overrides_help + " (prefix with run.)")
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("run", help="one strategy over a sequence")
    p.add_argument("config", nargs="?")
    p.add_argument("--resume", metavar="RUN_DIR", help="continue an interrupted run exactly from "
                   "its last good checkpoint (same config)")
    p.add_argument("overrides", nargs="*", help=overrides_help)
    p.set_defaults(func=cmd_run)

    p = sub.add_parser("bench", help="strategies × ranks over a sequence, one table")
    p.add_argument("config", nargs="?")
    p.add_argument("--resume", metavar="BENCH_DIR", help="continue an interrupted bench: finished "
                   "rows are kept, the interrupted one resumes from its checkpoints")
    p.add_argument("overrides", nargs="*", help=overrides_help)
    p.set_defaults(func=cmd_bench)

    p = sub.add_parser("eval", help="reload a run's saved adapter and heads and score them")
    p.add_argument("run_dir")
    p.add_argument("--stage", type=int, help="task number to reload (default: the last)")
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("validate", help="check a run or bench config without running it")
    p.add_argument("config")
    p.add_argument("overrides", nargs="*", help=overrides_help)
    p.set_defaults(func=cmd_validate)

    p = sub.add_parser("merge", help="merge PEFT LoRA adapters of one base by their dense "
                       "updates (TIES, task arithmetic, DARE, MagMax, or exact cat)")
    p.add_argument("adapters", nargs="+", metavar="ADAPTER_DIR")
    p.add_argument("--method", default="ties", help="ties (default), task_arithmetic, "
                   "dare_linear, dare_ties, magmax, cat")
    p.add_argument("--out", required=True, help="folder of the merged PEFT adapter")
    p.add_argument("--weights", nargs="+", type=float,
                   help="one weight for all adapters, or one per adapter (default 1)")
    p.add_argument("--density", type=float, help="ties/dare_ties: fraction of entries kept")
    p.add_argument("--drop-rate", type=float, help="dare_*: drop probability (default 0.5)")
    p.add_argument("--rank", type=int, help="rank of the output by truncated SVD (default: the "
                   "sum of the inputs' ranks); not for cat, which is exact")
    p.add_argument("--seed", type=int, default=0, help="seed of DARE's random drops")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    p.set_defaults(func=cmd_merge)

    p = sub.add_parser("report", help="the HTML report (report.html) of a run, bench or update "
                       "folder: accuracy matrix, per-task curves, strategies chart, metrics, "
                       "per-class forgetting, samples, lineage; PNGs in figures/")
    p.add_argument("folder", metavar="RUN_OR_BENCH_DIR")
    p.add_argument("--top", type=int, default=20, help="classes per bar chart (default 20)")
    p.add_argument("--cumulative", action="store_true", help="forgetting since each class was "
                   "learned (upstream: the base), not what each task itself made it forget")
    p.add_argument("--domain", action="append", metavar="TASK=WORD[,WORD]",
                   help="WordNet word(s) naming a task's domain for contextual forgetting "
                   "(default: the task's class names), e.g. hoofed=ungulate")
    p.set_defaults(func=cmd_report)

    p = sub.add_parser("diagnose", help="why did it forget? how a run's adapters interfere: "
                       "opposed parameters, subspace overlap, which layers moved, upstream "
                       "drift (CKA); writes diagnosis.json, diagnosis.md and figures")
    p.add_argument("paths", nargs="+", metavar="RUN_DIR_OR_ADAPTERS",
                   help="a run folder, a bench folder (every run in it), or two or more PEFT "
                   "adapter folders in task order")
    p.add_argument("--out", help="folder for the diagnosis (default: the run or bench folder, "
                   "whose report.html then gets a Diagnosis section; required for adapters)")
    p.add_argument("--no-drift", action="store_true", help="adapter math only: skip the "
                   "model's forward passes on the upstream probe (the CKA)")
    p.add_argument("--base", help="local folder of the base model, for ‖ΔW‖/‖W0‖ when the "
                   "adapters' own base name is not a local folder")
    p.add_argument("--cumulative", action="store_true", help="adapter folders: each continued "
                   "the previous one (τ_t = ΔW_t − ΔW_t-1), not each its own update from the base")
    p.add_argument("--batch-size", type=int, default=64, help="texts per forward pass (CKA)")
    p.set_defaults(func=cmd_diagnose)

    p = sub.add_parser("inspect", help="what an adapter is: format, base, rank, alpha, targets, "
                       "parameters, whether its weights match its lineage, and the lineage chain")
    p.add_argument("adapter", metavar="ADAPTER", help="adapter folder (PEFT, full weights) or "
                   "kohya .safetensors file")
    p.add_argument("--json", action="store_true", help="print the same as JSON")
    p.set_defaults(func=cmd_inspect)

    p = sub.add_parser("generate", help="what a causal-LM adapter says: load it on its base "
                       "and generate from prompts")
    p.add_argument("--adapter", help="PEFT adapter folder, a run's stage or run folder, or a "
                   "full model folder (default: the base alone)")
    p.add_argument("--base", help="base model, hub id or local folder (default: the one the "
                   "adapter's lineage names)")
    p.add_argument("--prompt", action="append", required=True,
                   help="a prompt (repeat for several, generated as one batch)")
    p.add_argument("--qa", action="store_true", help="wrap each prompt as a question in the "
                   "run's qa_template (default 'Question: {question}\\nAnswer:')")
    p.add_argument("--chat", action="store_true", help="send each prompt as a user turn through "
                   "the tokenizer's chat template")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.0, help="0: greedy (default)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--trust-remote-code", action="store_true",
                   help="run code shipped with a hub model (only for models you trust)")
    p.set_defaults(func=cmd_generate)

    update_cli.add_parser(sub)
    convert_cli.add_parser(sub)

    p = sub.add_parser("strategies", help="list the registered strategies")
    p.set_defaults(func=cmd_strategies)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except USER_ERRORS as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:
        if exc.errno in (errno.EROFS, errno.EACCES, errno.EPERM):
            # Output folders are probed before anything loads (output_dir.py); this is a path
            # that became unwritable later, or an input that cannot be read.
            why = "read-only file system" if exc.errno == errno.EROFS else "permission denied"
            print(f"error: {exc.filename or 'a file'}: {why}. Check that path's permissions "
                  "and that its disk is mounted writable, or choose another output folder.",
                  file=sys.stderr)
            return 2
        if exc.errno not in (errno.ENOSPC, errno.EDQUOT):
            raise
        print(f"error: no space left on the device while writing {exc.filename or 'a file'}. "
              "Every file is written whole or not at all, so what was written before is intact "
              "and nothing half-written was left. Free some space, then continue an "
              "interrupted run with `continual-lora run --resume RUN_DIR` (or an update with "
              "`continual-lora update --resume OUT`).", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
