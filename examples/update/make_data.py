"""Write the worked example's data files: real WordNet 3.0 glosses from the package, as CSV.

    python examples/update/make_data.py data/

writes, under data/:
    living_train.csv, living_eval.csv   stage 1: animal / plant / person / body
    coarse_train.csv, coarse_eval.csv   the new data: four coarse classes, two of which merge
                                        stage 1's (animal+plant, person+body), which is what
                                        makes a naive update forget the fine distinctions

Columns: text, label. The glosses of the two tasks do not overlap; 150 training and 50
held-out examples per class, seeded.
"""

from __future__ import annotations

import csv
import sys
from pathlib import Path

from continual_lora.config import load_run_config
from continual_lora.sequence import load_sequence

TASKS = {
    "living": ["noun.animal", "noun.plant", "noun.person", "noun.body"],
    "coarse": ["noun.animal+noun.plant", "noun.person+noun.body",
               "noun.artifact+noun.food", "noun.cognition+noun.communication"],
}
LABELS = {"noun.animal+noun.plant": "organism", "noun.person+noun.body": "human",
          "noun.artifact+noun.food": "thing", "noun.cognition+noun.communication": "idea"}


def write(folder: Path, per_class_train: int = 150, per_class_eval: int = 50) -> list[Path]:
    cfg = load_run_config(None, data={
        "upstream": {"kind": "none"},
        "tasks": [{"name": name, "wordnet": cats, "train_per_class": per_class_train,
                   "eval_per_class": per_class_eval} for name, cats in TASKS.items()]})
    tasks, _ = load_sequence(cfg)
    seen: set[str] = set()
    written = []
    folder.mkdir(parents=True, exist_ok=True)
    for task in tasks:
        for split in ("train", "eval"):
            data = getattr(task, split)
            path = folder / f"{task.name}_{split}.csv"
            with path.open("w", newline="", encoding="utf-8") as fh:
                out = csv.writer(fh)
                out.writerow(["text", "label"])
                for text, label in zip(data.texts, data.labels, strict=True):
                    if text in seen:  # a gloss in both tasks would blur what is measured
                        continue
                    seen.add(text)
                    category = task.classes[int(label)]
                    out.writerow([text, LABELS.get(category, category.removeprefix("noun."))])
            written.append(path)
    return written


if __name__ == "__main__":
    for path in write(Path(sys.argv[1] if len(sys.argv) > 1 else "data")):
        print(path)
