"""The `continual-lora update` subcommand: flags (or a YAML file) → UpdateConfig → `update`."""

from __future__ import annotations

import argparse
import re
from pathlib import Path

from continual_lora.config import ConfigError, parse_overrides

EXAMPLE = """examples:
  continual-lora update --adapter runs/a/tasks/01-a/adapter --new b.csv --out lora-v2 --dry-run
  continual-lora update --adapter lora-v1 --new b.csv --old a.csv --new-share 0.5 --out lora-v2
  continual-lora update --adapter lora-v1 --new b.csv --max-forgetting 0.02 --out lora-v2
  continual-lora update update.yaml                     (the same settings as a YAML file)
  continual-lora update --resume lora-v2                (continue an interrupted update)
"""
OLD_WITH_NAME = re.compile(r"^([A-Za-z0-9][A-Za-z0-9_.\-]*)=(.+)$")


def add_parser(sub) -> None:
    p = sub.add_parser(
        "update", help="update an existing LoRA with new data (and old data if you kept it), "
        "with a printed plan, a forgetting budget and a before/after report",
        epilog=EXAMPLE, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("config", nargs="?", help="a YAML file with the same settings (flags win)")
    p.add_argument("--adapter", help="the adapter to update: a PEFT folder, a run's stage "
                   "folder, or a run folder (its last stage)")
    p.add_argument("--base", help="base model, hub id or folder (default: the adapter's own)")
    p.add_argument("--new", help="new training data (CSV/TSV/JSONL/JSON/Parquet, text+label)")
    p.add_argument("--new-eval", help="held-out file of the new data (default: hold out 20%%)")
    p.add_argument("--new-name", help="name of the new task (default: the file's name)")
    p.add_argument("--old", action="append", metavar="[TASK=]FILE",
                   help="old data you kept (repeatable); TASK= names the old task it belongs to")
    p.add_argument("--strategy", help="auto (default), replay, lwf, olora, merge_reinit, ...")
    p.add_argument("--strategy-option", action="append", metavar="KEY=VALUE", default=[],
                   help="a strategy option, e.g. alpha=2 (repeatable)")
    p.add_argument("--new-share", type=float, help="share of new data in the stream with old "
                   "data (default 0.5), set by integer repeats")
    p.add_argument("--lr", type=float, help="learning rate (default: --lr-scale × the first "
                   "stage's)")
    p.add_argument("--lr-scale", type=float, help="default LR as a fraction of the first "
                   "stage's (default 0.4)")
    p.add_argument("--steps", type=int, help="training steps (default: ~3 passes over the new "
                   "data, within 100-300)")
    p.add_argument("--batch-size", type=int)
    p.add_argument("--max-forgetting", type=float, help="forgetting budget: largest allowed "
                   "drop of the old tasks' mean score (0.02 = two points)")
    p.add_argument("--eval-every", type=int, help="evaluate and checkpoint every N steps")
    p.add_argument("--rank", type=int, help="LoRA rank (default and required: the old one's)")
    p.add_argument("--alpha", type=float, help="LoRA alpha (default: the old one's)")
    p.add_argument("--targets", nargs="+", help="target modules (default: the old one's)")
    p.add_argument("--change-lora", action="store_true", default=None,
                   help="allow --rank/--alpha/--targets to differ from the old adapter's")
    p.add_argument("--allow-base-mismatch", action="store_true", default=None,
                   help="proceed when the base's fingerprint differs from the adapter's lineage")
    p.add_argument("--seed", type=int)
    p.add_argument("--out", help="folder of the new adapter (with the plan and report)")
    p.add_argument("--overwrite", action="store_true", default=None,
                   help="replace an existing --out")
    p.add_argument("--dry-run", action="store_true", help="print the plan and stop")
    p.add_argument("--resume", metavar="OUT", help="continue an interrupted update in OUT "
                   "exactly (same data and settings)")
    p.set_defaults(func=cmd_update)


def _absolute(path: str | None) -> str | None:
    return None if path is None else str(Path(path).expanduser().resolve())


def _old_entry(text: str) -> dict:
    match = OLD_WITH_NAME.match(text)
    if match and "/" not in match.group(1):
        return {"name": match.group(1), "train": _absolute(match.group(2))}
    return {"train": _absolute(text)}


def flag_values(args: argparse.Namespace) -> dict:
    """The settings given as flags (None: not given), paths made absolute (a YAML's relative
    paths are relative to the YAML; a flag's to the current folder)."""
    values = {
        "adapter": _absolute(args.adapter), "out": _absolute(args.out or args.resume),
        "strategy": args.strategy, "new_share": args.new_share, "lr": args.lr,
        "lr_scale": args.lr_scale, "steps": args.steps, "batch_size": args.batch_size,
        "max_forgetting": args.max_forgetting, "eval_every": args.eval_every,
        "rank": args.rank, "alpha": args.alpha, "target_modules": args.targets,
        "change_lora": args.change_lora, "allow_base_mismatch": args.allow_base_mismatch,
        "seed": args.seed, "overwrite": args.overwrite,
    }
    if args.base is not None:
        values["base"] = _absolute(args.base) if Path(args.base).exists() else args.base
    if args.new is not None or args.new_eval is not None or args.new_name is not None:
        if args.new is None:
            raise ConfigError("--new-eval/--new-name need --new (the new training file)")
        values["new"] = {k: v for k, v in {"train": _absolute(args.new),
                                           "eval": _absolute(args.new_eval),
                                           "name": args.new_name}.items() if v is not None}
    if args.old:
        values["old"] = [_old_entry(text) for text in args.old]
    if args.strategy_option:
        values["strategy_options"] = parse_overrides(args.strategy_option)
    return values


def cmd_update(args: argparse.Namespace) -> int:
    from continual_lora.update.config import load_update_config
    from continual_lora.update.run import CONFIG_FILE, update

    config = args.config
    if args.resume:
        if args.config or args.out:
            raise ConfigError("--resume OUT takes the settings stored in OUT; leave out the "
                              "config file and --out")
        config = Path(args.resume) / CONFIG_FILE
        if not config.is_file():
            raise ConfigError(f"--resume {args.resume}: no {CONFIG_FILE} there, so no update "
                              "was started in it (start one without --resume)")
    values = flag_values(args)
    missing = [flag for flag, key in (("--adapter", "adapter"), ("--new", "new"),
                                      ("--out", "out"))
               if values.get(key) is None and config is None]
    if missing:
        raise ConfigError(f"update needs {', '.join(missing)} (or a YAML file with them); see "
                          "`continual-lora update --help`")
    cfg = load_update_config(config, values)
    result = update(cfg, dry_run=args.dry_run, resume=bool(args.resume))
    if not args.dry_run:
        from continual_lora.report.page import write_report_or_warn

        write_report_or_warn(result.out)
    return 0
