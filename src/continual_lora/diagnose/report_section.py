"""The "Diagnosis" section of report.html, built from the diagnosis.json that
`continual-lora diagnose` wrote into a run or bench folder (and the PNGs it lists). A folder
without one gets no section: the report builds the same as before."""

from __future__ import annotations

import json
from pathlib import Path

from continual_lora.diagnose.tables import BENCH_COLUMNS, MEANING, fmt
from continual_lora.report.html import esc, image, table

DIAGNOSIS_JSON = "diagnosis.json"  # written by command.py, read here

CAPTIONS = {
    "diagnosis_pairs.png": "per pair of tasks and layer: opposed ratio, cosine, input and output "
                           "subspace overlap",
    "diagnosis_layer_norms.png": "which layers moved: ‖τ_t‖/‖W0‖ per task and layer",
    "diagnosis_drift.png": "upstream representation drift: CKA with the base per layer, after "
                           "each task",
    "diagnosis_strategies.png": "forgetting against the mean interference between consecutive "
                                "tasks, one point per run",
}


def _read(folder: Path) -> dict | None | str:
    """The folder's diagnosis, None when there is none, or a line saying why it cannot be read."""
    file = folder / DIAGNOSIS_JSON
    if not file.is_file():
        return None
    try:
        return json.loads(file.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        return (f'<p class="meta">{esc(file)} could not be read ({esc(exc)}): run '
                f"`continual-lora diagnose {esc(folder)}` again</p>")


def _figures(diagnosis: dict, folder: Path, page_dir: Path) -> str:
    return "".join(image(folder / rel, page_dir, CAPTIONS.get(Path(rel).name, rel))
                   for rel in diagnosis.get("figures", []))


def _meaning() -> str:
    return f'<pre class="defs">{esc(MEANING)}</pre>'


def run_section(run_dir: Path, page_dir: Path) -> str:
    """A run's diagnosis: the verdict, the pairs table, the figures."""
    diagnosis = _read(run_dir)
    if diagnosis is None or isinstance(diagnosis, str):
        return diagnosis or ""
    tv = diagnosis["task_vectors"]
    rows = [[f"{p['tasks'][0]} → {p['tasks'][1]}", fmt(p["opposed_ratio"]), fmt(p["cosine"]),
             fmt(p["overlap_input"]), fmt(p["chance_overlap_input"]), fmt(p["overlap_output"]),
             fmt(p["chance_overlap_output"])] for p in diagnosis["pairs"]]
    return ("<h3>Diagnosis: why did it forget?</h3>"
            + "".join(f"<p>{esc(line)}</p>" for line in diagnosis["verdict"])
            + f'<p class="meta">task vectors ({esc(tv["definition"])}): '
              f"{esc(tv['explanation'])}</p>"
            + table(["earlier → later task", "opposed ratio", "cosine", "input overlap",
                     "(chance)", "output overlap", "(chance)"], rows, numeric_from=1)
            + _figures(diagnosis, run_dir, page_dir) + _meaning())


def bench_section(bench: Path) -> str:
    """The bench's diagnosis: do the strategies that forget less interfere less?"""
    diagnosis = _read(bench)
    if diagnosis is None or isinstance(diagnosis, str):
        return diagnosis or ""
    rows = [[r["label"], r.get("rank") or "–", *[fmt(r.get(key)) for key, _ in BENCH_COLUMNS],
             r["definition"]] for r in diagnosis["runs"]]
    return ('<section class="card"><h2>Diagnosis: do the strategies that forget less interfere '
            "less?</h2>"
            + "".join(f"<p>{esc(line)}</p>" for line in diagnosis["verdict"])
            + table(["strategy", "rank", *[title for _, title in BENCH_COLUMNS],
                     "task vectors"], rows, "diagnosis", numeric_from=1)
            + '<p class="meta">means over consecutive task pairs; CKA at the last layer after '
              "the last task; each run's section below has its own diagnosis</p>"
            + _figures(diagnosis, bench, bench) + _meaning() + "</section>")
