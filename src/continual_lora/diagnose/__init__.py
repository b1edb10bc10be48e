"""`continual-lora diagnose`: why a sequence of LoRA adapters forgot, from the adapters and the run
folder alone.

The pieces, one job each:

    measures.py        pure math on tensors: opposed-parameter ratio, cosine, principal-angle
                       subspace overlap, linear CKA, relative norm, and what chance gives for each
    task_vectors.py    run folders and adapter folders → one update τ_t per task and module
                       (in factored form), with the definition used for that strategy
    base_weights.py    the base's W0 of each adapted module, read from its safetensors files
    analysis.py        the measures over every pair of tasks, per module and per layer
    drift.py           linear CKA of the upstream probe's pooled representations, base vs adapted
    verdict.py         the short text that links the numbers to the strategies
    tables.py          diagnosis.md and what the command prints: the numbers as tables
    figures.py         the heatmaps and the bench chart (PNG)
    report_section.py  the "Diagnosis" section of report.html, from diagnosis.json
    command.py         what the command does with a path: find runs, diagnose, write the files
"""
