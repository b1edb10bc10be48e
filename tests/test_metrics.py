"""Hand-computed checks of continual_lora.metrics.

Notation as in the module: R has shape (T+1, T); row t = after training through task t (row 0 =
before training); column i-1 = task i. In the comments below "R[t, task i]" means the array
element R[t, i-1].
"""

from __future__ import annotations

import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from continual_lora import metrics as m

# ---------------------------------------------------------------------------------------------
# Matrix A: 3 tasks, clear forgetting.
#             task1 task2 task3
R_A = np.array(
    [
        [0.1, 0.2, 0.3],  # row 0: before training
        [0.9, 0.3, 0.3],  # row 1: after task 1
        [0.7, 0.8, 0.4],  # row 2: after task 2
        [0.5, 0.6, 0.9],  # row 3: after task 3 (final)
    ]
)
# ACC  = (0.5 + 0.6 + 0.9) / 3 = 2.0 / 3
# AIA  = ( 0.9                      t=1
#        + (0.7 + 0.8) / 2          t=2 -> 0.75
#        + (0.5 + 0.6 + 0.9) / 3    t=3 -> 0.6667
#        ) / 3 = (0.9 + 0.75 + 2/3) / 3 = 0.772222...
# F    task1: max(R[1],R[2]) = max(0.9, 0.7) = 0.9, minus final 0.5 -> 0.4
#      task2: max(R[2]) = 0.8, minus final 0.6 -> 0.2
#      F = (0.4 + 0.2) / 2 = 0.3
# BWT  task1: 0.5 - 0.9 = -0.4 ; task2: 0.6 - 0.8 = -0.2 ; BWT = -0.6 / 2 = -0.3
# FWT  task2: R[1, task2] - R[0, task2] = 0.3 - 0.2 = 0.1
#      task3: R[2, task3] - R[0, task3] = 0.4 - 0.3 = 0.1 ; FWT = 0.2 / 2 = 0.1
# P    (R[1,task1] + R[2,task2] + R[3,task3]) / 3 = (0.9 + 0.8 + 0.9) / 3 = 2.6 / 3
EXPECTED_A = {
    "acc": 2.0 / 3,
    "avg_incremental_acc": (0.9 + 0.75 + 2.0 / 3) / 3,
    "forgetting": 0.3,
    "bwt": -0.3,
    "fwt": 0.1,
    "plasticity": 2.6 / 3,
}

# ---------------------------------------------------------------------------------------------
# Matrix B: task 1 keeps improving after its own training -> negative forgetting, positive BWT.
#             task1 task2 task3
R_B = np.array(
    [
        [0.2, 0.1, 0.5],  # row 0: before training
        [0.6, 0.1, 0.4],  # row 1: after task 1
        [0.8, 0.7, 0.4],  # row 2: after task 2
        [0.9, 0.7, 0.8],  # row 3: after task 3 (final)
    ]
)
# ACC  = (0.9 + 0.7 + 0.8) / 3 = 2.4 / 3 = 0.8
# AIA  = (0.6 + (0.8 + 0.7) / 2 + 0.8) / 3 = (0.6 + 0.75 + 0.8) / 3 = 2.15 / 3
# F    task1: max(0.6, 0.8) = 0.8, minus final 0.9 -> -0.1   (raw, not clipped)
#      task2: max(0.7) = 0.7, minus final 0.7 -> 0.0
#      F = (-0.1 + 0.0) / 2 = -0.05
# BWT  task1: 0.9 - 0.6 = 0.3 ; task2: 0.7 - 0.7 = 0.0 ; BWT = 0.3 / 2 = 0.15
# FWT  task2: 0.1 - 0.1 = 0.0 ; task3: R[2, task3] - R[0, task3] = 0.4 - 0.5 = -0.1
#      FWT = -0.1 / 2 = -0.05
# P    (0.6 + 0.7 + 0.8) / 3 = 2.1 / 3 = 0.7
EXPECTED_B = {
    "acc": 0.8,
    "avg_incremental_acc": 2.15 / 3,
    "forgetting": -0.05,
    "bwt": 0.15,
    "fwt": -0.05,
    "plasticity": 0.7,
}

# ---------------------------------------------------------------------------------------------
# Matrix C: the max in forgetting is reached at an intermediate stage, so forgetting and BWT
# disagree in sign.
R_C = np.array(
    [
        [0.0, 0.0, 0.0],
        [0.6, 0.0, 0.0],
        [0.9, 0.5, 0.0],
        [0.7, 0.5, 1.0],
    ]
)
# F    task1: max(0.6, 0.9) - 0.7 = 0.2 ; task2: 0.5 - 0.5 = 0 ; F = 0.2 / 2 = 0.1
# BWT  task1: 0.7 - 0.6 = 0.1 ; task2: 0.5 - 0.5 = 0 ; BWT = 0.1 / 2 = 0.05


FUNCS = {
    "acc": m.average_accuracy,
    "avg_incremental_acc": m.average_incremental_accuracy,
    "forgetting": m.forgetting,
    "bwt": m.backward_transfer,
    "fwt": m.forward_transfer,
    "plasticity": m.plasticity,
}


@pytest.mark.parametrize("R, expected", [(R_A, EXPECTED_A), (R_B, EXPECTED_B)], ids=["A", "B"])
@pytest.mark.parametrize("key", list(FUNCS))
def test_matrix_metrics(R, expected, key):
    value = FUNCS[key](R)
    assert isinstance(value, float)
    assert value == pytest.approx(expected[key], abs=1e-12)


@pytest.mark.parametrize("R, expected", [(R_A, EXPECTED_A), (R_B, EXPECTED_B)], ids=["A", "B"])
def test_summarize_matches(R, expected):
    out = m.summarize(R)
    assert set(out) == set(expected)
    for k, v in expected.items():
        assert type(out[k]) is float
        assert out[k] == pytest.approx(v, abs=1e-12)


def test_forgetting_uses_max_over_intermediate_stages():
    assert m.forgetting(R_C) == pytest.approx(0.1)
    assert m.backward_transfer(R_C) == pytest.approx(0.05)


# ---------------------------------------------------------------------------------------------
# Matrix D: 4 tasks where each old task scored HIGHER before it was trained (rows < i, the base
# row 0 included) than at any stage after its own training. So a forgetting whose max starts at
# row 0, row 1 or row i-1 instead of row i, or that also takes the final row T, gives another
# value; and BWT/FWT/plasticity/AIA read a cell next to one they might read by an off-by-one.
#             task1 task2 task3 task4
R_D = np.array(
    [
        [0.95, 0.90, 0.85, 0.10],  # row 0: before training (the base already does well)
        [0.50, 0.80, 0.20, 0.20],  # row 1: after task 1
        [0.60, 0.60, 0.70, 0.30],  # row 2: after task 2
        [0.45, 0.30, 0.50, 0.40],  # row 3: after task 3
        [0.30, 0.20, 0.55, 0.90],  # row 4: after task 4 (final)
    ]
)
# F    task1: max(rows 1..3) = max(0.50, 0.60, 0.45) = 0.60, final 0.30 -> 0.30
#      task2: max(rows 2..3) = max(0.60, 0.30)       = 0.60, final 0.20 -> 0.40
#      task3: max(row 3)     = 0.50,                         final 0.55 -> -0.05
#      F = (0.30 + 0.40 - 0.05) / 3 = 0.65 / 3
#   wrong variants, each a different value:
#      max from row 0   : (0.95-0.30) + (0.90-0.20) + (0.85-0.55) = 1.65 -> 1.65 / 3
#      max from row 1   : 0.30 + (0.80-0.20) + (0.70-0.55)        = 1.05 -> 1.05 / 3
#      max from row i-1 : 0.65 + 0.60 + 0.15                      = 1.40 -> 1.40 / 3
#      max up to row T  : 0.30 + 0.40 + (0.55-0.55)               = 0.70 -> 0.70 / 3
#      R[i,i] not max   : 0.20 + 0.40 - 0.05                      = 0.55 -> 0.55 / 3
# BWT  (0.30-0.50) + (0.20-0.60) + (0.55-0.50) = -0.55 -> -0.55 / 3
#      (R[i-1, i] in place of R[i, i] would give (-0.65 - 0.60 - 0.15) / 3 = -1.40 / 3)
# FWT  task2: R[1,t2] - R[0,t2] = 0.80 - 0.90 = -0.10
#      task3: R[2,t3] - R[0,t3] = 0.70 - 0.85 = -0.15
#      task4: R[3,t4] - R[0,t4] = 0.40 - 0.10 =  0.30 ; FWT = 0.05 / 3
#      (R[i, i] in place of R[i-1, i] would give (-0.30 - 0.35 + 0.80) / 3 = 0.15 / 3)
# P    (R[1,t1] + R[2,t2] + R[3,t3] + R[4,t4]) / 4 = (0.50 + 0.60 + 0.50 + 0.90) / 4 = 2.5 / 4
#      (the array's main diagonal R[i-1, i] would give 2.85 / 4)
# AIA  t=1: 0.50 ; t=2: (0.60 + 0.60) / 2 = 0.60 ; t=3: (0.45 + 0.30 + 0.50) / 3 = 1.25 / 3
#      t=4: (0.30 + 0.20 + 0.55 + 0.90) / 4 = 1.95 / 4
#      AIA = (0.50 + 0.60 + 1.25 / 3 + 1.95 / 4) / 4
# ACC  1.95 / 4 (row 3 would give 1.65 / 4)
EXPECTED_D = {
    "acc": 1.95 / 4,
    "avg_incremental_acc": (0.50 + 0.60 + 1.25 / 3 + 1.95 / 4) / 4,
    "forgetting": 0.65 / 3,
    "bwt": -0.55 / 3,
    "fwt": 0.05 / 3,
    "plasticity": 2.5 / 4,
}
FUNC_NAMES = {
    "acc": "average_accuracy",
    "avg_incremental_acc": "average_incremental_accuracy",
    "forgetting": "forgetting",
    "bwt": "backward_transfer",
    "fwt": "forward_transfer",
    "plasticity": "plasticity",
}


@pytest.mark.parametrize("key", list(FUNC_NAMES))
def test_scores_before_training_do_not_count(key):
    """Matrix D: a score from before a task was trained (above its later maximum) must not
    enter forgetting; the other metrics read exactly the cells their formulas name. The
    function is looked up on the module at call time, so a patched copy is what runs."""
    value = getattr(m, FUNC_NAMES[key])(R_D)
    assert isinstance(value, float)
    assert value == pytest.approx(EXPECTED_D[key], abs=1e-12)
    assert m.summarize(R_D)[key] == pytest.approx(EXPECTED_D[key], abs=1e-12)


def test_forgetting_max_starts_at_the_tasks_own_stage():
    # The pre-training scores R_D[0:i, i-1] are above the post-training maximum for tasks 1-3.
    for i in (1, 2, 3):
        assert R_D[:i, i - 1].max() > R_D[i:4, i - 1].max()
    assert m.forgetting(R_D) == pytest.approx(0.65 / 3, abs=1e-12)
    for wrong in (1.65 / 3, 1.05 / 3, 1.40 / 3, 0.70 / 3, 0.55 / 3):
        assert abs(m.forgetting(R_D) - wrong) > 1e-3


def test_accepts_nested_lists():
    assert m.forgetting(R_A.tolist()) == pytest.approx(0.3)


# ---------------------------------------------------------------------------------------------
# T = 1


def test_single_task_edge_cases():
    R = [[0.2], [0.7]]  # shape (2, 1)
    assert m.average_accuracy(R) == pytest.approx(0.7)
    assert m.average_incremental_accuracy(R) == pytest.approx(0.7)
    assert m.plasticity(R) == pytest.approx(0.7)
    assert math.isnan(m.forgetting(R))
    assert math.isnan(m.backward_transfer(R))
    assert math.isnan(m.forward_transfer(R))
    out = m.summarize(R, U=[0.8, 0.6])
    assert math.isnan(out["forgetting"]) and math.isnan(out["bwt"]) and math.isnan(out["fwt"])
    assert out["acc"] == pytest.approx(0.7)
    assert out["upstream_retention"] == pytest.approx(0.75)
    assert out["upstream_drop"] == pytest.approx(0.2)


# ---------------------------------------------------------------------------------------------
# validation


@pytest.mark.parametrize(
    "R, shape_text",
    [
        (np.zeros((3, 3)), "(3, 3)"),
        (np.zeros((2, 3)), "(2, 3)"),
        (np.zeros((5, 3)), "(5, 3)"),
        (np.zeros((1, 0)), "(1, 0)"),
        (np.zeros(4), "(4,)"),
        (np.zeros((2, 2, 1)), "(2, 2, 1)"),
    ],
)
@pytest.mark.parametrize("fn", [*FUNCS.values(), m.summarize])
def test_invalid_shape_raises(fn, R, shape_text):
    with pytest.raises(ValueError) as exc:
        fn(R)
    assert shape_text in str(exc.value)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_raises(bad):
    R = R_A.copy()
    R[2, 1] = bad
    with pytest.raises(ValueError, match=r"non-finite.*\(2, 1\)"):
        m.forgetting(R)
    with pytest.raises(ValueError, match="non-finite"):
        m.summarize(R)


def test_summarize_checks_upstream_length():
    with pytest.raises(ValueError, match=r"length T\+1 = 4.*\(3,\)"):
        m.summarize(R_A, U=[0.8, 0.7, 0.6])
    with pytest.raises(ValueError, match="non-finite"):
        m.summarize(R_A, U=[0.8, 0.7, float("nan"), 0.5])


# ---------------------------------------------------------------------------------------------
# upstream


def test_upstream_metrics():
    U = [0.8, 0.7, 0.6, 0.4]  # base 0.8, final U[3] = 0.4
    assert m.upstream_retention(U) == pytest.approx(0.4 / 0.8)  # = 0.5
    assert m.upstream_drop(U) == pytest.approx(0.8 - 0.4)  # = 0.4
    out = m.summarize(R_A, U=U)
    assert out["upstream_before"] == pytest.approx(0.8)
    assert out["upstream_after"] == pytest.approx(0.4)
    assert out["upstream_retention"] == pytest.approx(0.5)
    assert out["upstream_drop"] == pytest.approx(0.4)
    for k, v in EXPECTED_A.items():
        assert out[k] == pytest.approx(v)
    assert all(type(v) is float for v in out.values())


def test_upstream_retention_zero_base_is_nan():
    assert math.isnan(m.upstream_retention([0.0, 0.3]))
    assert m.upstream_drop([0.0, 0.3]) == pytest.approx(-0.3)


def test_upstream_invalid():
    with pytest.raises(ValueError, match=r"\(1,\)"):
        m.upstream_retention([0.5])
    with pytest.raises(ValueError, match=r"\(2, 2\)"):
        m.upstream_drop(np.zeros((2, 2)))


# ---------------------------------------------------------------------------------------------
# per-sample flips

# old task 1 (5 examples):
AFTER_1 = np.array([True, True, False, False, True])
END_1 = np.array([True, False, True, False, False])
#   1->0 at idx 1, 4 (2 forgotten); 0->1 at idx 2 (1 learned)
# old task 2 (3 examples):
AFTER_2 = np.array([False, True, True])
END_2 = np.array([True, True, False])
#   1->0 at idx 2 (1 forgotten); 0->1 at idx 0 (1 learned)
# n = 5 + 3 = 8 ; forgotten = 3/8 ; learned = 2/8


def test_per_sample_flips():
    out = m.per_sample_flips([AFTER_1, AFTER_2], [END_1, END_2])
    assert out["n"] == 8
    assert out["forgotten"] == pytest.approx(3 / 8)
    assert out["learned"] == pytest.approx(2 / 8)
    assert out["n_forgotten"] == 3 and out["n_learned"] == 2


def test_per_sample_flips_accepts_0_1_ints():
    out = m.per_sample_flips([AFTER_1.astype(int)], [END_1.astype(int)])
    assert out["n"] == 5 and out["forgotten"] == pytest.approx(2 / 5)
    assert out["learned"] == pytest.approx(1 / 5)


def test_per_sample_flips_empty_is_nan():
    out = m.per_sample_flips([], [])
    assert out["n"] == 0
    assert math.isnan(out["forgotten"]) and math.isnan(out["learned"])


def test_per_sample_flips_mismatch():
    with pytest.raises(ValueError, match="2 tasks"):
        m.per_sample_flips([AFTER_1, AFTER_2], [END_1])
    with pytest.raises(ValueError, match=r"\(5,\).*\(3,\)"):
        m.per_sample_flips([AFTER_1], [END_2])


def test_flips_from_history():
    T = 3
    correct = {
        1: {1: AFTER_1},
        2: {1: np.zeros(5, bool), 2: AFTER_2},  # correct[2][1] is not used
        3: {1: END_1, 2: END_2, 3: np.ones(4, bool)},  # the last task is not an old task
    }
    out = m.flips_from_history(correct, T)
    assert out["n"] == 8
    assert out["forgotten"] == pytest.approx(3 / 8)
    assert out["learned"] == pytest.approx(2 / 8)


def test_flips_from_history_edge_cases():
    out = m.flips_from_history({1: {1: np.ones(3, bool)}}, 1)
    assert out["n"] == 0 and math.isnan(out["forgotten"])
    with pytest.raises(ValueError, match=r"correct\[3\]\[2\]"):
        m.flips_from_history({1: {1: AFTER_1}, 2: {2: AFTER_2}, 3: {1: END_1}}, 3)
    with pytest.raises(ValueError, match="T must be"):
        m.flips_from_history({}, 0)


# ---------------------------------------------------------------------------------------------
# per-class forgetting


def test_per_class_forgetting_ordering():
    class_names = ["cat", "dog", "eel", "fox", "ant", "bee"]
    labels = np.array([0, 0, 1, 1, 1, 3, 3, 4, 5])
    before = np.array([1, 1, 1, 1, 0, 0, 1, 1, 0], bool)
    after = np.array([1, 0, 0, 0, 0, 1, 0, 1, 1], bool)
    # cat: before 2/2 = 1.0, after 1/2 = 0.5 -> drop 0.5
    # dog: before 2/3,       after 0/3 = 0   -> drop 2/3
    # eel: no examples -> left out
    # fox: before 1/2,       after 1/2       -> drop 0
    # ant: before 1/1,       after 1/1       -> drop 0   (ties with fox: "ant" < "fox")
    # bee: before 0/1,       after 1/1       -> drop -1
    rows = m.per_class_forgetting(labels, before, after, class_names)
    assert [r[0] for r in rows] == ["dog", "cat", "ant", "fox", "bee"]
    expected = {
        "dog": (2 / 3, 0.0, 2 / 3),
        "cat": (1.0, 0.5, 0.5),
        "ant": (1.0, 1.0, 0.0),
        "fox": (0.5, 0.5, 0.0),
        "bee": (0.0, 1.0, -1.0),
    }
    for name, b, a, d in rows:
        assert (b, a, d) == pytest.approx(expected[name])


def test_per_class_forgetting_invalid():
    with pytest.raises(ValueError, match=r"\[0, 2\)"):
        m.per_class_forgetting([0, 2], [True, True], [True, False], ["a", "b"])
    with pytest.raises(ValueError, match="same shape"):
        m.per_class_forgetting([0, 1], [True], [True, False], ["a", "b"])


# ---------------------------------------------------------------------------------------------
# no torch


def test_metrics_does_not_import_torch():
    src = Path(__file__).resolve().parents[1] / "src"
    env = dict(os.environ)
    env["PYTHONPATH"] = str(src) + (os.pathsep + env["PYTHONPATH"] if "PYTHONPATH" in env else "")
    code = "import continual_lora.metrics, sys; assert 'torch' not in sys.modules, 'torch imported'"
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr


def test_per_round_knowledge_view_by_hand():
    # 3 rounds of facts; row 0 is the base, which knows none of them.
    R = [[0.0, 0.0, 0.0],
         [0.8, 0.0, 0.1],
         [0.4, 0.9, 0.0],
         [0.2, 0.6, 1.0]]
    rows = m.per_round(R)
    assert [r["acquisition"] for r in rows] == [0.8, 0.9, 1.0]
    assert math.isnan(rows[0]["retention"]) and math.isnan(rows[0]["retained"])
    assert rows[1]["retention"] == pytest.approx(0.4)
    assert rows[2]["retention"] == pytest.approx((0.2 + 0.6) / 2)
    assert rows[1]["retained"] == pytest.approx(0.4 / 0.8)
    assert rows[2]["retained"] == pytest.approx((0.2 + 0.6) / (0.8 + 0.9))
    assert rows[2]["seen"] == pytest.approx((0.2 + 0.6 + 1.0) / 3)
    assert rows[0]["seen"] == pytest.approx(0.8)
