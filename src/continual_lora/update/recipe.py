"""Seed 000's recipe for a second stage, as defaults: pure functions, each with its reason.

"Existing 20 images + new 10 images: set the LR low (1.0 → 0.3~0.5), short steps (100~300)";
"to reflect the new images more quickly, double num_repeats only for the new ones". Every value
here is a default the plan prints with where it came from; every one can be overridden.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

TOOL_DEFAULT_LR = 1e-3  # TrainConfig.lr's default: what a first stage of this tool used
DEFAULT_BATCH = 32
MIN_STEPS, MAX_STEPS = 100, 300
PASSES_OVER_NEW = 3  # how many times the default schedule shows each new example
MAX_REPEATS = 16
SHARE_TOLERANCE = 0.02  # repeats as small as possible, within 2 points of the asked share
DEFAULT_NEW_SHARE = 0.5

# `auto` without old data: the strategy with the best measured trade-off among those that need
# no old data, in docs/results/bench_no_old_data.md (the demo sequence, ranks 2 and 16).
BENCH_FILE = "docs/results/bench_no_old_data.md"
NO_OLD_DATA_CHOICE = "lwf"
NO_OLD_DATA_REASON = (
    f"no old data: lwf, the best no-old-data strategy in {BENCH_FILE} (ACC 0.892, "
    "forgetting -0.003 at rank 2; 0.880 and 0.009 at rank 16) that also writes an exact PEFT "
    "adapter (magmax forgot as little but its adapter is an SVD approximation, export error "
    "0.15-0.18); it distils the old heads' outputs on the new data")
NO_HEADS_CHOICE = "merge_reinit"
NO_HEADS_REASON = (
    f"no old data and no old heads to distil: merge_reinit, the least-forgetting strategy of "
    f"{BENCH_FILE} that needs neither (forgetting 0.014 at rank 2, 0.026 at rank 16); it merges "
    "the old adapter into the base and trains a fresh one")
WITH_OLD_DATA_REASON = (
    "old data is given: replay, the seeds' most reliable choice when the data is kept "
    f"(forgetting 0.008 at rank 2 in {BENCH_FILE}, against naive's 0.019)")


@dataclass(frozen=True)
class Choice:
    value: float | int | str
    why: str


def learning_rate(requested: float | None, old_lr: float | None, scale: float) -> Choice:
    if requested is not None:
        return Choice(requested, "given")
    if old_lr is not None:
        return Choice(old_lr * scale, f"{scale:g} × the first stage's lr {old_lr:g} (from the "
                                      "old adapter's lineage)")
    return Choice(TOOL_DEFAULT_LR * scale,
                  f"{scale:g} × {TOOL_DEFAULT_LR:g}: the old adapter's lineage does not record "
                  "its first stage (no lineage.json, or only updates of an adapter without one), "
                  "so the first stage's lr is unknown and this tool's default is assumed; pass "
                  "--lr if it was trained otherwise")


def batch_size(requested: int | None, old_batch: int | None) -> Choice:
    if requested is not None:
        return Choice(requested, "given")
    if old_batch is not None:
        return Choice(old_batch, "the first stage's (from the old adapter's lineage)")
    return Choice(DEFAULT_BATCH, "default (the old adapter's lineage does not record its first "
                                 "stage)")


def steps(requested: int | None, n_new: int, new_share: float, batch: int) -> Choice:
    """About `PASSES_OVER_NEW` passes over the new data at its share of the stream, within
    [MIN_STEPS, MAX_STEPS]: seed 000's "short steps (100~300)", scaled to the data."""
    if requested is not None:
        return Choice(requested, "given")
    raw = math.ceil(PASSES_OVER_NEW * n_new / (new_share * batch))
    value = min(MAX_STEPS, max(MIN_STEPS, raw))
    clamp = "" if value == raw else f", kept within {MIN_STEPS}-{MAX_STEPS}"
    return Choice(value, f"{PASSES_OVER_NEW} passes over the {n_new} new examples at "
                         f"{new_share:.0%} of batches of {batch} = {raw}{clamp}")


def repeats_for_share(n_new: int, n_old: int, share: float, max_repeats: int = MAX_REPEATS,
                      tolerance: float = SHARE_TOLERANCE) -> tuple[int, int, float]:
    """Integer repeats (new, old) for a per-epoch share of new examples
    n_new·r_new / (n_new·r_new + n_old·r_old) near `share`: the pair with the smallest
    r_new + r_old among those within `tolerance` (then the closer, then the smaller r_new);
    when none is, the closest pair. Small repeats keep an "epoch" a meaningful unit, as a
    kohya user would set them by hand. Returns (r_new, r_old, achieved share)."""
    if n_old == 0:
        return 1, 1, 1.0
    pairs = []
    for r_new in range(1, max_repeats + 1):
        for r_old in range(1, max_repeats + 1):
            achieved = n_new * r_new / (n_new * r_new + n_old * r_old)
            pairs.append((round(abs(achieved - share), 12), r_new, r_old, achieved))
    within = [p for p in pairs if p[0] <= tolerance + 1e-12]
    if within:
        _, r_new, r_old, achieved = min(within, key=lambda p: (p[1] + p[2], p[0], p[1]))
    else:
        _, r_new, r_old, achieved = min(pairs, key=lambda p: (p[0], p[1] + p[2]))
    return r_new, r_old, achieved


def eval_every(requested: int | None, total_steps: int) -> Choice:
    if requested is not None:
        return Choice(min(requested, total_steps), "given")
    value = min(total_steps, max(10, total_steps // 10))
    return Choice(value, "a tenth of the steps, at least 10")


def auto_strategy(has_old_data: bool, has_old_heads: bool) -> Choice:
    if has_old_data:
        return Choice("replay", WITH_OLD_DATA_REASON)
    if has_old_heads:
        return Choice(NO_OLD_DATA_CHOICE, NO_OLD_DATA_REASON)
    return Choice(NO_HEADS_CHOICE, NO_HEADS_REASON)
