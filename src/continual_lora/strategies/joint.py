"""joint: for task t, a fresh adapter from the base trained on tasks 1..t together."""

from peft import PeftModel

from continual_lora.registry import register_strategy
from continual_lora.sequence import Source
from continual_lora.strategies.base import Strategy, TaskContext, fresh_adapter, new_data


@register_strategy
class JointStrategy(Strategy):
    """The upper bound on average accuracy: retrain from the base on the union of all tasks so
    far (seed 000's "20 + 10 = retrain 30"). Every seen task's head is re-initialised and
    trained with it."""

    name = "joint"
    needs_old_data = True
    summary = "retrain from the base on all tasks so far (upper bound)"

    def before_task(self, ctx: TaskContext) -> None:
        family = ctx.family
        if ctx.t == 1 and isinstance(family.backbone, PeftModel):
            return  # the run's starting point (a user's adapter) is already attached
        base = family.backbone if ctx.t == 1 else family.fresh_backbone()
        family.set_backbone(fresh_adapter(ctx, base, from_user_adapter=True))

    def heads(self, ctx: TaskContext) -> tuple[list[int], list[int]]:
        seen = [x.index for x in ctx.seen]
        return seen, seen

    def sources(self, ctx: TaskContext) -> list[Source]:
        out = []
        for task in ctx.seen:
            src = new_data(task)
            src.role = "new" if task.index == ctx.t else "joint"
            out.append(src)
        return out
