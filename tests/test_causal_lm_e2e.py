"""End to end on the embedded causal LM (the small Llama pretrained in-process; built once,
about 3.5 minutes on 2 cores, then cached): facts added over two rounds are learned, measured
per round, and answered by `generate` from the saved adapter."""

from __future__ import annotations

import json
import math

import pytest

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def knowledge_bench(tmp_path_factory):
    from continual_lora.bench import run_bench
    from continual_lora.config import load_bench_config

    out = tmp_path_factory.mktemp("knowledge")
    cfg = load_bench_config(None, data={
        "name": "knowledge-small",
        "strategies": [{"name": "naive"}, {"name": "replay"},
                       {"name": "full_ft", "label": "full_ft_replay",
                        "options": {"lr": 5e-4, "replay": True}}],
        "include_joint": False,
        "run": {"model": {"family": "causal_lm", "max_length": 64}, "lora": {"r": 8},
                "train": {"lr": 5e-3, "batch_size": 16, "epochs": 80, "warmup_ratio": 0.05},
                "upstream": {"kind": "general_text", "size": 200},
                "tasks": [{"name": "r1-hypernym", "facts": 1, "facts_per_round": 20},
                          {"name": "r2-synonym", "facts": 2, "facts_per_round": 20}],
                "output_dir": str(out)}})
    bench_dir, results = run_bench(cfg, echo=lambda _: None)
    return bench_dir, {r.run_dir.name: r for r in results}


def test_rounds_are_learned_and_measured(knowledge_bench):
    bench_dir, results = knowledge_bench
    for label, result in results.items():
        assert (result.R[0] == 0).all(), label  # the base knows none of the new facts
        assert result.R[1, 0] >= 0.5, label  # round 1 learned
        assert result.R[2, 1] >= 0.5, label  # round 2 learned
        base_ppl = 1 / result.U[0]
        assert 20 < base_ppl < 400  # the pretrained model predicts general text
    rounds = (bench_dir / "rounds.md").read_text()
    assert "| replay | 2 r2-synonym |" in rounds and "upstream perplexity" in rounds
    # Replay sees round 1 again while learning round 2: it keeps at least as much of it.
    assert results["replay-r8"].R[2, 0] >= results["naive-r8"].R[2, 0]


def test_generate_answers_a_learned_fact(knowledge_bench):
    from continual_lora.data.facts import fact_rounds
    from continual_lora.families.causal_lm import exact_match
    from continual_lora.generate import generate, load_for_generation

    _, results = knowledge_bench
    run_dir = results["replay-r8"].run_dir
    correct = json.loads((run_dir / "results.json").read_text())
    assert not math.isnan(correct["R"][2][1])
    facts = fact_rounds(rounds=2, per_round=20)[1].facts
    loaded = load_for_generation(run_dir, None)
    answers = generate(loaded, [f.question for f in facts], max_new_tokens=24, qa=True)
    hits = sum(exact_match(a, f.answer) for a, f in zip(answers, facts, strict=True))
    # The same questions through plain transformers + PEFT: as many right as the run measured.
    assert hits / len(facts) == pytest.approx(correct["R"][2][1])
