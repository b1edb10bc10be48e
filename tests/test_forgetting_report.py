"""Per-class and contextual forgetting read from predictions, against hand-computed values."""

from __future__ import annotations

import numpy as np
import pytest

from continual_lora.data.wordnet import index_by_id, load_wordnet, wu_palmer
from continual_lora.report.forgetting import (
    class_forgetting,
    contextual_forgetting,
    resolve_synsets,
)

BEAR, SHEEP, ONE, TWO = "n02131653", "n02411705", "n13742573", "n13743269"
COW, HORSE = "n01887787", "n02374451"


def _image_run() -> dict:
    """Upstream classes bear, sheep, one, two (two examples each); tasks hoofed, digits."""
    b = lambda *xs: np.array(xs, dtype=bool)  # noqa: E731
    return {
        "classes/upstream": np.array(["bear", "sheep", "one", "two"]),
        "labels/upstream": np.array([0, 0, 1, 1, 2, 2, 3, 3]),
        "correct/stage0/upstream": b(1, 1, 1, 1, 1, 0, 1, 1),
        "correct/stage1/upstream": b(0, 1, 1, 1, 1, 0, 1, 1),  # bear loses one of two
        "correct/stage2/upstream": b(0, 1, 1, 1, 0, 1, 0, 0),  # one swaps, two loses both
        "labels/hoofed": np.array([0, 1]), "classes/hoofed": np.array(["cow", "horse"]),
        "labels/digits": np.array([0, 1]), "classes/digits": np.array(["five", "six"]),
        **{f"correct/stage{t}/{task}": b(1, 1) for t in range(3) for task in ("hoofed",
                                                                               "digits")},
    }


def test_senses_follow_the_label_sets_majority_lexname():
    ids = resolve_synsets(["bear", "sheep", "one", "two", "cow", "horse"])
    # bear: the animal (not the investor); one: the number (quantity, not cognition)
    assert ids == {"bear": BEAR, "sheep": SHEEP, "one": ONE, "two": TWO, "cow": COW,
                   "horse": HORSE}
    assert resolve_synsets(["n02084071", "unicorn-x"]) == {"n02084071": "n02084071",
                                                          "unicorn-x": None}


def test_what_each_task_made_the_model_forget():
    stages = class_forgetting(_image_run())
    first = {c.name: (c.before, c.after, c.drop, c.forgotten) for c in stages[0].classes}
    assert first == {"bear": (1.0, 0.5, 0.5, 1), "sheep": (1.0, 1.0, 0.0, 0),
                     "one": (0.5, 0.5, 0.0, 0), "two": (1.0, 1.0, 0.0, 0)}
    assert [c.name for c in stages[0].classes][0] == "bear"  # sorted by drop
    second = {c.name: (c.drop, c.forgotten) for c in stages[1].classes}
    assert second == {"two": (1.0, 2), "bear": (0.0, 0), "sheep": (0.0, 0), "one": (0.0, 1)}
    cumulative = {c.name: (c.drop, c.forgotten)
                  for c in class_forgetting(_image_run(), cumulative=True)[1].classes}
    assert cumulative["bear"] == (0.5, 1) and cumulative["two"] == (1.0, 2)


def test_contextual_similarity_is_weighted_by_images():
    by_id = index_by_id(load_wordnet())
    stage = contextual_forgetting(_image_run())[0]
    sim = {name: np.mean([wu_palmer(i, COW, by_id), wu_palmer(i, HORSE, by_id)])
           for name, i in (("bear", BEAR), ("sheep", SHEEP), ("one", ONE), ("two", TWO))}
    assert {r[0]: r[1] for r in stage.classes} == pytest.approx(sim)
    # every class has two held-out images: the plain mean; only bear lost an image
    assert stage.similarity_all == pytest.approx(np.mean(list(sim.values())))
    assert stage.similarity_forgotten == pytest.approx(sim["bear"])
    assert sim["bear"] > stage.similarity_all  # an animal task made it forget an animal
    words = contextual_forgetting(_image_run(), {"digits": ["digit"]})[1]
    assert words.domain == ["digit"] and words.similarity_forgotten < 1


def test_text_runs_use_the_earlier_tasks_classes():
    b = lambda *xs: np.array(xs, dtype=bool)  # noqa: E731
    pred = {"labels/a": np.array([0, 1]), "classes/a": np.array(["noun.animal", "noun.plant"]),
            "labels/b": np.array([0, 1]), "classes/b": np.array(["noun.food", "noun.act"]),
            "correct/stage0/a": b(0, 0), "correct/stage1/a": b(1, 1),
            "correct/stage2/a": b(1, 0), "correct/stage0/b": b(0, 0),
            "correct/stage1/b": b(0, 0), "correct/stage2/b": b(1, 1)}
    stages = class_forgetting(pred)
    assert stages[0].classes == [] and stages[1].source == "earlier tasks"
    assert [(c.name, c.drop) for c in stages[1].classes] == [("a/noun.plant", 1.0),
                                                             ("a/noun.animal", 0.0)]
    assert contextual_forgetting(pred)[1].classes == []  # lexnames are not WordNet nouns
