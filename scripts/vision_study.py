"""Summarise seed 002's study run with `configs/bench_vision.yaml` over models and seeds.

    for seed in 0 1 2; do for arch in vit resnet; do
      continual-lora bench configs/bench_vision.yaml name=vision-$arch-s$seed \\
          run.model.name_or_path=embedded:$arch run.seed=$seed run.output_dir=study
      continual-lora report study/vision-$arch-s$seed
    done; done
    python scripts/vision_study.py study/vision-* --out docs/results/vision

Prints the tables of docs/results/bench_vision.md (mean ± sd over seeds) and draws
`rank_retention.png` (upstream retention against rank) into --out. Reads run folders only.
"""

from __future__ import annotations

import argparse
import json
import re
from collections import defaultdict
from pathlib import Path

import numpy as np

from continual_lora.report.forgetting import contextual_forgetting, load_predictions

DOMAIN_WORDS = {"hoofed": ["ungulate"], "digits": ["digit"]}


def _runs(bench_dirs: list[Path]):
    for bench in bench_dirs:
        match = re.match(r"vision-(\w+)-s(\d+)$", bench.name)
        if not match:
            continue
        model, seed = match.group(1), int(match.group(2))
        for run_dir in sorted((bench / "runs").iterdir()):
            if (run_dir / "metrics.json").is_file():
                yield model, seed, run_dir


def _ms(values) -> str:
    values = [v for v in values if np.isfinite(v)]
    if not values:
        return "–"
    return f"{np.mean(values):.3f} ± {np.std(values):.3f}" if len(values) > 1 else \
        f"{values[0]:.3f}"


def collect(bench_dirs: list[Path]) -> dict:
    table = defaultdict(lambda: defaultdict(list))
    for model, seed, run_dir in _runs(bench_dirs):
        m = json.loads((run_dir / "metrics.json").read_text())
        results = json.loads((run_dir / "results.json").read_text())
        key = (model, m["label"], m["rank"])
        row = table[key]
        row["retention"].append(m["upstream_retention"])
        row["acc"].append(m["acc"])
        row["forgetting"].append(m["forgetting"])
        row["U"].append(results["U"])
        pred = load_predictions(run_dir)
        for name, domains in (("classes", None), ("words", DOMAIN_WORDS)):
            for stage in contextual_forgetting(pred, domains):
                gap = stage.similarity_forgotten - stage.similarity_all
                row[f"gap/{name}/{stage.task}"].append(gap)
                row[f"rho/{name}/{stage.task}"].append(stage.spearman)
        row["seeds"].append(seed)
    return table


def format_tables(table: dict) -> str:
    keys = sorted(table, key=lambda k: (k[0] != "vit", k[1] != "merge_reinit", k[2]))
    lines = ["| model | LwF | rank | upstream after task 1 | upstream after task 2 | upstream "
             "retention | ACC | forgetting | seeds |", "|---|---|---|---|---|---|---|---|---|"]
    for k in keys:
        row = table[k]
        u = np.array(row["U"])
        lines.append(f"| {k[0]} | {'yes' if k[1].startswith('lwf') else 'no'} | {k[2]} | "
                     f"{_ms(u[:, 1])} | {_ms(u[:, 2])} | {_ms(row['retention'])} | "
                     f"{_ms(row['acc'])} | {_ms(row['forgetting'])} | {len(row['seeds'])} |")
    lines += ["", "Contextual forgetting: Wu-Palmer similarity to the task's domain of the images "
              "the task made the model forget, minus that of all upstream held-out images "
              "(> 0: the forgotten images are closer to the new domain); Spearman ρ over the 11 "
              "upstream classes between similarity and accuracy drop. Domain = the task's class "
              "names (words: `ungulate`, `digit`).", "",
              "| model | LwF | rank | hoofed: gap (classes) | hoofed: gap (ungulate) | "
              "hoofed: ρ | digits: gap (classes) | digits: gap (digit) | digits: ρ |",
              "|---|---|---|---|---|---|---|---|---|"]
    for k in keys:
        row = table[k]
        lines.append(
            f"| {k[0]} | {'yes' if k[1].startswith('lwf') else 'no'} | {k[2]} | "
            f"{_ms(row['gap/classes/hoofed'])} | {_ms(row['gap/words/hoofed'])} | "
            f"{_ms(row['rho/classes/hoofed'])} | {_ms(row['gap/classes/digits'])} | "
            f"{_ms(row['gap/words/digits'])} | {_ms(row['rho/classes/digits'])} |")
    return "\n".join(lines)


def plot_retention(table: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.5, 3.6))
    styles = {("vit", False): ("#c0392b", "-"), ("vit", True): ("#c0392b", "--"),
              ("resnet", False): ("#2c3e50", "-"), ("resnet", True): ("#2c3e50", "--")}
    for (model, lwf), (color, ls) in styles.items():
        keys = sorted((k for k in table if k[0] == model and k[1].startswith("lwf") == lwf),
                      key=lambda k: k[2])
        if not keys:
            continue
        ranks = [k[2] for k in keys]
        mean = [np.mean(table[k]["retention"]) for k in keys]
        sd = [np.std(table[k]["retention"]) for k in keys]
        ax.errorbar(ranks, mean, yerr=sd, color=color, ls=ls, marker="o", capsize=3,
                    label=f"{model}{' + LwF' if lwf else ''}")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("LoRA rank (merged after each task)")
    ax.set_ylabel("upstream retention U[2]/U[0]")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("benches", nargs="+", type=Path)
    parser.add_argument("--out", type=Path, help="folder for rank_retention.png")
    args = parser.parse_args()
    table = collect(args.benches)
    print(format_tables(table))
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        plot_retention(table, args.out / "rank_retention.png")


if __name__ == "__main__":
    main()
