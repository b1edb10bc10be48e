"""Continual-learning metrics: pure functions of numpy arrays.

This module imports only numpy and the standard library (never torch), so reports can be
computed anywhere.

Notation (shared by every function here)
----------------------------------------
Tasks are numbered ``1..T`` in the math. The accuracy matrix ``R`` is a numpy array of shape
``(T+1, T)``:

* row ``t`` (``0 <= t <= T``) is the evaluation after training through task ``t``; row ``0``
  is the model before any training (the base model);
* column ``i-1`` holds task ``i`` (arrays are 0-based, tasks are 1-based).

So the math expression ``R[t, i]`` (stage ``t``, task ``i``) is the array element
``R[t, i - 1]``. The formulas in the docstrings below are written in the 1-based math notation
and each one also states the 0-based array expression it computes.

``U`` is a vector of length ``T+1``: ``U[t]`` is the upstream (original-capability) score after
training through task ``t``; ``U[0]`` is the base model's score. Rows and ``U`` share the same
0-based stage index, so ``U[t]`` needs no shift.

Scores are expected in ``[0, 1]`` (not enforced). All values must be finite: NaN or inf in an
input raises ``ValueError``. Metrics that are undefined (for example forgetting with a single
task) return ``float("nan")``. All returned numbers are plain Python floats.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

__all__ = [
    "average_accuracy",
    "average_incremental_accuracy",
    "backward_transfer",
    "flips_from_history",
    "forgetting",
    "forward_transfer",
    "per_class_forgetting",
    "per_round",
    "per_sample_flips",
    "plasticity",
    "summarize",
    "upstream_drop",
    "upstream_retention",
]

_NAN = float("nan")


# --------------------------------------------------------------------------------------------
# validation
# --------------------------------------------------------------------------------------------


def _check_R(R: Any) -> tuple[np.ndarray, int]:
    """Return ``(R as float64 array, T)`` after checking shape ``(T+1, T)``, ``T >= 1``, finite."""
    arr = np.asarray(R, dtype=np.float64)
    if arr.ndim != 2:
        raise ValueError(
            f"accuracy matrix R must be 2-D with shape (T+1, T); got {arr.ndim}-D "
            f"array of shape {arr.shape}"
        )
    rows, T = arr.shape
    if T < 1 or rows != T + 1:
        raise ValueError(
            f"accuracy matrix R must have shape (T+1, T) with T >= 1; got shape {arr.shape}"
        )
    if not np.all(np.isfinite(arr)):
        bad = [tuple(int(x) for x in idx) for idx in np.argwhere(~np.isfinite(arr))[:5]]
        raise ValueError(
            f"accuracy matrix R of shape {arr.shape} has non-finite values (NaN/inf) at "
            f"(row, col) {bad}"
        )
    return arr, T


def _check_U(U: Any, T: int | None = None) -> np.ndarray:
    """Return ``U`` as a float64 vector after checking it is 1-D, finite, length >= 2 (or T+1)."""
    arr = np.asarray(U, dtype=np.float64)
    if arr.ndim != 1:
        raise ValueError(f"upstream vector U must be 1-D with length T+1; got shape {arr.shape}")
    if T is not None and arr.shape[0] != T + 1:
        raise ValueError(
            f"upstream vector U must have length T+1 = {T + 1} to match R with T = {T}; "
            f"got shape {arr.shape}"
        )
    if arr.shape[0] < 2:
        raise ValueError(
            f"upstream vector U must have length T+1 >= 2 (base score plus one per task); "
            f"got shape {arr.shape}"
        )
    if not np.all(np.isfinite(arr)):
        raise ValueError(f"upstream vector U of shape {arr.shape} has non-finite values (NaN/inf)")
    return arr


# --------------------------------------------------------------------------------------------
# accuracy-matrix metrics
# --------------------------------------------------------------------------------------------


def average_accuracy(R: Any) -> float:
    """Final average accuracy over all tasks.

    Formula (1-based math)::

        ACC = (1/T) * sum_{i=1..T} R[T, i]

    Array form (0-based columns): ``mean(R[T, 0:T])``, i.e. the mean of the last row.

    Raises ``ValueError`` if ``R`` is not a finite array of shape ``(T+1, T)`` with ``T >= 1``.
    """
    arr, T = _check_R(R)
    return float(arr[T, :].mean())


def average_incremental_accuracy(R: Any) -> float:
    """Average incremental accuracy: the mean, over stages, of the accuracy on tasks seen so far.

    Formula (1-based math)::

        AIA = (1/T) * sum_{t=1..T} (1/t) * sum_{i=1..t} R[t, i]

    Array form (0-based columns): ``mean over t=1..T of mean(R[t, 0:t])``.
    Row 0 (before training) is not used.
    """
    arr, T = _check_R(R)
    total = 0.0
    for t in range(1, T + 1):
        total += float(arr[t, :t].mean())
    return total / T


def forgetting(R: Any) -> float:
    """Average forgetting (Chaudhry et al., 2018), raw (not clipped at 0).

    Formula (1-based math)::

        F = (1/(T-1)) * sum_{i=1..T-1} ( max_{t in [i, T-1]} R[t, i]  -  R[T, i] )

    i.e. for each task except the last, the best accuracy it had at any stage from right after
    its own training (stage ``i``) up to stage ``T-1``, minus its final accuracy. The term can be
    negative if a task ends higher than it ever was before (then it is not clipped).

    Array form (0-based columns): for ``i`` in ``1..T-1``:
    ``max(R[i:T, i-1]) - R[T, i-1]``; the mean of these.

    Returns ``nan`` when ``T == 1`` (no earlier task to forget).
    """
    arr, T = _check_R(R)
    if T == 1:
        return _NAN
    terms = [float(arr[i:T, i - 1].max() - arr[T, i - 1]) for i in range(1, T)]
    return sum(terms) / (T - 1)


def backward_transfer(R: Any) -> float:
    """Backward transfer (Lopez-Paz & Ranzato, 2017).

    Formula (1-based math)::

        BWT = (1/(T-1)) * sum_{i=1..T-1} ( R[T, i] - R[i, i] )

    Negative BWT means forgetting; positive means later training helped earlier tasks.

    Array form (0-based columns): mean over ``i`` in ``1..T-1`` of ``R[T, i-1] - R[i, i-1]``.

    Returns ``nan`` when ``T == 1``.
    """
    arr, T = _check_R(R)
    if T == 1:
        return _NAN
    terms = [float(arr[T, i - 1] - arr[i, i - 1]) for i in range(1, T)]
    return sum(terms) / (T - 1)


def forward_transfer(R: Any) -> float:
    """Forward transfer: accuracy on a task just before training on it, relative to the base model.

    Formula (1-based math)::

        FWT = (1/(T-1)) * sum_{i=2..T} ( R[i-1, i] - R[0, i] )

    Array form (0-based columns): mean over ``i`` in ``2..T`` of ``R[i-1, i-1] - R[0, i-1]``.

    Returns ``nan`` when ``T == 1``.
    """
    arr, T = _check_R(R)
    if T == 1:
        return _NAN
    terms = [float(arr[i - 1, i - 1] - arr[0, i - 1]) for i in range(2, T + 1)]
    return sum(terms) / (T - 1)


def plasticity(R: Any) -> float:
    """Plasticity: mean accuracy on each task right after training on it.

    Formula (1-based math)::

        P = (1/T) * sum_{i=1..T} R[i, i]

    Array form (0-based columns): mean over ``i`` in ``1..T`` of ``R[i, i-1]``, i.e. the mean of
    the diagonal just below the main diagonal of the ``(T+1, T)`` array.
    """
    arr, T = _check_R(R)
    return float(sum(arr[i, i - 1] for i in range(1, T + 1)) / T)


# --------------------------------------------------------------------------------------------
# upstream (original capability) metrics
# --------------------------------------------------------------------------------------------


def upstream_retention(U: Any) -> float:
    """Fraction of the base model's upstream score kept at the end.

    Formula::

        retention = U[T] / U[0]

    where ``U`` has length ``T+1`` and ``U[T]`` is its last element (0-based array index equals
    the stage index here). Returns ``nan`` if ``U[0] == 0``.
    """
    arr = _check_U(U)
    if arr[0] == 0:
        return _NAN
    return float(arr[-1] / arr[0])


def upstream_drop(U: Any) -> float:
    """Absolute drop of the upstream score from the base model to the end.

    Formula::

        drop = U[0] - U[T]

    where ``U[T]`` is the last element of ``U`` (length ``T+1``). Positive means the upstream
    capability got worse.
    """
    arr = _check_U(U)
    return float(arr[0] - arr[-1])


# --------------------------------------------------------------------------------------------
# per-example and per-class analyses
# --------------------------------------------------------------------------------------------


def _as_bool_vector(x: Any, what: str) -> np.ndarray:
    arr = np.asarray(x)
    if arr.ndim != 1:
        raise ValueError(f"{what} must be a 1-D boolean array; got shape {arr.shape}")
    if arr.dtype != np.bool_:
        if arr.size and not np.all(np.isin(arr, (0, 1))):
            raise ValueError(f"{what} must be boolean (or 0/1); got dtype {arr.dtype}")
        arr = arr.astype(bool)
    return arr


def per_sample_flips(
    correct_after_own_task: Sequence[Any], correct_at_end: Sequence[Any]
) -> dict[str, float | int]:
    """Per-example flips between "right after its own task" and "at the end".

    Inputs are two lists with one entry per old task (the tasks ``i < T``, in the same order);
    entry ``k`` of each is a 1-D boolean array over the same held-out examples of that task:
    ``a_k = correct_after_own_task[k]`` (correctness right after training on that task, stage
    ``i``) and ``b_k = correct_at_end[k]`` (correctness after the last task, stage ``T``).

    Formulas, with ``n = sum_k len(a_k)`` the total number of examples over all tasks passed::

        forgotten = (1/n) * sum_k count(a_k & ~b_k)     # right -> wrong  (1 -> 0)
        learned   = (1/n) * sum_k count(~a_k & b_k)     # wrong -> right  (0 -> 1)

    Returns ``{"forgotten": float, "learned": float, "n": int, "n_forgotten": int,
    "n_learned": int}``. With ``n == 0`` (e.g. no old tasks, ``T == 1``) both fractions are
    ``nan``.

    Raises ``ValueError`` if the lists differ in length or a pair of arrays differ in shape.
    """
    if len(correct_after_own_task) != len(correct_at_end):
        raise ValueError(
            f"correct_after_own_task has {len(correct_after_own_task)} tasks but correct_at_end "
            f"has {len(correct_at_end)}"
        )
    n = 0
    n_forgotten = 0
    n_learned = 0
    for k, (a_raw, b_raw) in enumerate(zip(correct_after_own_task, correct_at_end, strict=True)):
        a = _as_bool_vector(a_raw, f"correct_after_own_task[{k}]")
        b = _as_bool_vector(b_raw, f"correct_at_end[{k}]")
        if a.shape != b.shape:
            raise ValueError(
                f"task entry {k}: correct_after_own_task has shape {a.shape} but correct_at_end "
                f"has shape {b.shape}"
            )
        n += int(a.size)
        n_forgotten += int(np.count_nonzero(a & ~b))
        n_learned += int(np.count_nonzero(~a & b))
    if n == 0:
        return {"forgotten": _NAN, "learned": _NAN, "n": 0, "n_forgotten": 0, "n_learned": 0}
    return {
        "forgotten": n_forgotten / n,
        "learned": n_learned / n,
        "n": n,
        "n_forgotten": n_forgotten,
        "n_learned": n_learned,
    }


def flips_from_history(correct: Mapping[int, Mapping[int, Any]], T: int) -> dict[str, float | int]:
    """Per-example flips from a correctness history.

    ``correct[t][i]`` is the 1-D boolean array of per-example correctness on task ``i``
    (1-based) after training stage ``t`` (1-based; the same indices as ``R[t, i]`` in the math).
    For every old task ``i`` in ``1..T-1`` this compares ``correct[i][i]`` (right after its own
    training) with ``correct[T][i]`` (at the end), i.e.::

        per_sample_flips([correct[i][i] for i in 1..T-1], [correct[T][i] for i in 1..T-1])

    See :func:`per_sample_flips` for the formulas. With ``T == 1`` there is no old task, ``n`` is
    0 and the fractions are ``nan``. Raises ``ValueError`` if ``T < 1`` or an entry is missing.
    """
    if int(T) != T or T < 1:
        raise ValueError(f"T must be an integer >= 1; got {T!r}")
    T = int(T)
    after_own: list[Any] = []
    at_end: list[Any] = []
    for i in range(1, T):
        for t in (i, T):
            if t not in correct or i not in correct[t]:
                raise ValueError(
                    f"correctness history is missing correct[{t}][{i}] (stage {t}, task {i})"
                )
        after_own.append(correct[i][i])
        at_end.append(correct[T][i])
    return per_sample_flips(after_own, at_end)


def per_class_forgetting(
    labels: Any,
    correct_before: Any,
    correct_after: Any,
    class_names: Sequence[str],
) -> list[tuple[str, float, float, float]]:
    """Per-class accuracy before and after, sorted by the drop.

    ``labels`` is a 1-D integer array of class indices (``0 <= label < len(class_names)``);
    ``correct_before`` and ``correct_after`` are 1-D boolean arrays of the same length (the same
    examples evaluated at two stages). For every class ``c`` with ``n_c >= 1`` examples::

        acc_before[c] = count(correct_before & labels == c) / n_c
        acc_after[c]  = count(correct_after  & labels == c) / n_c
        drop[c]       = acc_before[c] - acc_after[c]

    Returns a list of ``(class_names[c], acc_before, acc_after, drop)`` tuples, sorted by ``drop``
    descending, ties broken by class name ascending. Classes with no example are left out.
    """
    lab = np.asarray(labels)
    if lab.ndim != 1:
        raise ValueError(f"labels must be a 1-D integer array; got shape {lab.shape}")
    if lab.size and not np.issubdtype(lab.dtype, np.integer):
        if not np.all(np.mod(lab, 1) == 0):
            raise ValueError(f"labels must be integers; got dtype {lab.dtype}")
        lab = lab.astype(np.int64)
    before = _as_bool_vector(correct_before, "correct_before")
    after = _as_bool_vector(correct_after, "correct_after")
    if not (lab.shape == before.shape == after.shape):
        raise ValueError(
            f"labels, correct_before and correct_after must have the same shape; got "
            f"{lab.shape}, {before.shape}, {after.shape}"
        )
    n_classes = len(class_names)
    if lab.size and (lab.min() < 0 or lab.max() >= n_classes):
        raise ValueError(
            f"labels must lie in [0, {n_classes}) to index class_names; got range "
            f"[{int(lab.min())}, {int(lab.max())}]"
        )
    rows: list[tuple[str, float, float, float]] = []
    for c in range(n_classes):
        mask = lab == c
        n_c = int(np.count_nonzero(mask))
        if n_c == 0:
            continue
        acc_b = int(np.count_nonzero(before & mask)) / n_c
        acc_a = int(np.count_nonzero(after & mask)) / n_c
        rows.append((str(class_names[c]), acc_b, acc_a, acc_b - acc_a))
    rows.sort(key=lambda r: (-r[3], r[0]))
    return rows


# --------------------------------------------------------------------------------------------
# summary
# --------------------------------------------------------------------------------------------


def per_round(R: Any) -> list[dict[str, float]]:
    """Per stage t = 1..T, the knowledge-addition view of seed 004:

    * ``acquisition`` = R[t, t] (array ``R[t, t-1]``): the round just learned;
    * ``retention`` = (1/(t-1)) Σ_{i<t} R[t, i] (array ``R[t, :t-1].mean()``): the earlier rounds
      now, NaN at t = 1;
    * ``retained`` = Σ_{i<t} R[t, i] / Σ_{i<t} R[i, i]: the share of what the earlier rounds had
      reached when learned that is still there (NaN at t = 1 or when they reached 0);
    * ``seen`` = (1/t) Σ_{i≤t} R[t, i]: every round so far.
    """
    arr, T = _check_R(R)
    rows = []
    for t in range(1, T + 1):
        earlier = arr[t, : t - 1]
        reached = float(np.sum([arr[i, i - 1] for i in range(1, t)]))
        rows.append({
            "acquisition": float(arr[t, t - 1]),
            "retention": float(earlier.mean()) if t > 1 else _NAN,
            "retained": float(earlier.sum() / reached) if t > 1 and reached > 0 else _NAN,
            "seen": float(arr[t, :t].mean()),
        })
    return rows


def summarize(R: Any, U: Any = None) -> dict[str, float]:
    """All scalar metrics of one run as a dict of Python floats (NaN allowed).

    Keys: ``acc`` (:func:`average_accuracy`), ``avg_incremental_acc``
    (:func:`average_incremental_accuracy`), ``forgetting`` (:func:`forgetting`), ``bwt``
    (:func:`backward_transfer`), ``fwt`` (:func:`forward_transfer`), ``plasticity``
    (:func:`plasticity`). When ``U`` is given (it must have length ``T+1`` to match ``R``), also
    ``upstream_before = U[0]``, ``upstream_after = U[T]``, ``upstream_retention = U[T] / U[0]``
    (:func:`upstream_retention`) and ``upstream_drop = U[0] - U[T]`` (:func:`upstream_drop`).
    """
    arr, T = _check_R(R)
    out: dict[str, float] = {
        "acc": average_accuracy(arr),
        "avg_incremental_acc": average_incremental_accuracy(arr),
        "forgetting": forgetting(arr),
        "bwt": backward_transfer(arr),
        "fwt": forward_transfer(arr),
        "plasticity": plasticity(arr),
    }
    if U is not None:
        u = _check_U(U, T)
        out["upstream_before"] = float(u[0])
        out["upstream_after"] = float(u[T])
        out["upstream_retention"] = upstream_retention(u)
        out["upstream_drop"] = upstream_drop(u)
    return {k: float(v) for k, v in out.items()}
