"""`continual-lora update`: one new stage on an adapter trained earlier, with a plan printed
before step 1, seed 000's recipe as defaults, a forgetting budget and a before/after report.

    config.py    UpdateConfig: the command's typed, strict settings (YAML or flags)
    old.py       what the old adapter is: its files, lineage, heads, rank/alpha/targets
    recipe.py    the defaults (LR scale, steps, repeats for a new-data share, `auto`): pure
    data.py      the new and old data as tasks, held-out splits, the no-old-data probe
    budget.py    the step hook that evaluates every N steps, checkpoints and keeps the budget
    report.py    the before/after report: terminal text and files
    run.py       the orchestration: plan, train, save
"""
