"""naive: keep training the same adapter on each new task (kohya's `--network_weights`)."""

from continual_lora.registry import register_strategy
from continual_lora.strategies.base import Strategy


@register_strategy
class NaiveStrategy(Strategy):
    """One adapter, created before task 1 (or the user's, loaded trainable), trained on task 1,
    then task 2, ... Optimizer and schedule restart at each task; the weights carry over."""

    name = "naive"
    summary = "keep training one adapter on each new task"
