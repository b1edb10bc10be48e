"""The causal-LM family on a tiny Llama: loss masks, chat templates, exact match, perplexity,
LwF's top-k cache, greedy decoding, config errors, and every strategy end to end."""

from __future__ import annotations

import itertools
import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from continual_lora.config import ConfigError, ModelConfig, load_run_config
from continual_lora.families.causal_lm import (
    IGNORE,
    CausalLMFamily,
    exact_match,
    normalize_answer,
    pack_rows,
)
from continual_lora.lm_data import split_of
from continual_lora.registry import strategy_names
from continual_lora.sequence import TaskData, TextProbe
from continual_lora.strategies.lwf import TokenCache, top_k_distillation_loss


@pytest.fixture(scope="module")
def family(tiny_llama):
    fam = CausalLMFamily(ModelConfig(family="causal_lm", name_or_path=str(tiny_llama),
                                     max_length=64))
    fam.load()
    return fam


_names = itertools.count(1)


def _task(records: list[dict], scorer: str = "perplexity") -> TaskData:
    """Task 1, under a new name each time: the family caches tokens per task (index, name)."""
    return TaskData(1, f"t{next(_names)}", [], split_of(records), split_of(records),
                    scorer=scorer)


# -- what carries loss --------------------------------------------------------------------------


def test_prompt_tokens_carry_no_loss(family):
    tok = family.tokenizer
    prompt = tok("A dog is")["input_ids"]
    completion = tok(" a domestic animal", add_special_tokens=False)["input_ids"]
    ids, mask = family.encode({"prompt": "A dog is", "completion": " a domestic animal"})
    assert ids == prompt + completion + [tok.eos_token_id]
    assert mask == [0] * len(prompt) + [1] * (len(completion) + 1)

    batch = family.collate([(1, 0)], {1: _task([{"prompt": "A dog is",
                                                  "completion": " a domestic animal"}])})
    targets = batch["targets"][0].tolist()
    # Position j predicts token j+1: the first target is at the prompt's last token.
    first = len(prompt) - 1
    assert [j for j, t in enumerate(targets) if t != IGNORE] == list(range(first, len(ids) - 1))
    assert targets[first:len(ids) - 1] == completion + [tok.eos_token_id]
    assert batch["segments"][0, : len(ids)].tolist() == [0] * len(ids)


def test_question_answer_uses_the_template_and_learns_the_answer(family):
    tok = family.tokenizer
    ids, mask = family.encode({"question": "What is a dog?", "answer": "animal"})
    prompt = tok("Question: What is a dog?\nAnswer:")["input_ids"]
    answer = tok(" animal", add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    assert ids == prompt + answer
    assert mask == [0] * len(prompt) + [1] * len(answer)
    text_ids, text_mask = family.encode({"text": "a dog barks"})
    assert text_mask == [0] + [1] * (len(text_ids) - 1)  # every token but the first
    assert text_ids[-1] == tok.eos_token_id


def test_chat_template_is_used_and_only_assistant_turns_learn(family):
    tok = family.tokenizer
    messages = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"},
                {"role": "user", "content": "more"}, {"role": "assistant", "content": "ok"}]
    rendered = tok.apply_chat_template(messages, tokenize=False)
    assert rendered == ("<|user|>\nhi<|end|>\n<|assistant|>\nhello<|end|>\n"
                        "<|user|>\nmore<|end|>\n<|assistant|>\nok<|end|>\n")
    ids, mask = family.encode({"messages": messages})
    assert ids == tok(rendered, add_special_tokens=False)["input_ids"]
    learned = [i for i, m in zip(ids, mask, strict=True) if m]
    assert tok.decode(learned, skip_special_tokens=False) == "hello<|end|>\nok<|end|>\n"


def test_question_answer_as_chat_is_the_one_turn_conversation(family):
    family.cfg.chat_template = True
    try:
        as_qa = family.encode({"question": "What is a dog?", "answer": "an animal"})
        prompt, answer = family.prompt_and_answer({"question": "What is a dog?", "answer": "x"})
    finally:
        family.cfg.chat_template = False
    messages = [{"role": "user", "content": "What is a dog?"},
                {"role": "assistant", "content": "an animal"}]
    assert as_qa == family.encode({"messages": messages})
    tok = family.tokenizer
    assert tok.decode(prompt, skip_special_tokens=False) == "<|user|>\nWhat is a dog?<|end|>\n" \
        "<|assistant|>\n"


def test_pack_rows_fills_rows_in_order(family):
    assert pack_rows([3, 4, 2, 5], 8) == [[0, 1], [2, 3]]
    assert pack_rows([9, 1], 8) == [[0], [1]]
    records = [{"prompt": "a b", "completion": " c"}, {"text": "dog cat"},
               {"question": "q?", "answer": "yes"}]
    task = _task(records)
    plain = family.collate([(1, 0), (1, 1), (1, 2)], {1: task})
    family.cfg.packing = True
    try:
        packed = family.collate([(1, 0), (1, 1), (1, 2)], {1: task})
    finally:
        family.cfg.packing = False
    assert packed["input_ids"].shape[0] == 1  # three short examples fit one 64-token row
    # The same targets, in the same order, each tagged with its example.
    assert packed["targets"][packed["targets"] != IGNORE].tolist() == \
        plain["targets"][plain["targets"] != IGNORE].tolist()
    assert packed["segments"][packed["targets"] != IGNORE].tolist() == \
        plain["segments"][plain["targets"] != IGNORE].tolist()


# -- scores -------------------------------------------------------------------------------------


@pytest.mark.parametrize("prediction, reference, same", [
    ("The Canine!", "canine", True),
    ("  a  dog \nand more text", "Dog", True),
    ("an apple.", "apple", True),
    ("dogs", "dog", False),
    ("", "dog", False),
    ("hot dog", "dog", False),
])
def test_exact_match_normalisation(prediction, reference, same):
    assert exact_match(prediction, reference) is same


def test_normalize_answer():
    assert normalize_answer("The  Quick, brown-fox.") == "quick brownfox"


def test_perplexity_against_a_hand_computed_value(family):
    texts = ["a dog is a domestic animal", "rain"]
    score = family.score_upstream(TextProbe("p", texts), batch_size=2)
    nll = []
    with torch.no_grad():
        for text in texts:  # one at a time: no padding involved
            ids = family.tokenizer(text)["input_ids"] + [family.tokenizer.eos_token_id]
            logits = family.backbone(input_ids=torch.tensor([ids]))[0][0]
            log_p = F.log_softmax(logits.float(), dim=-1)
            nll += [-float(log_p[j, ids[j + 1]]) for j in range(len(ids) - 1)]
    perplexity = math.exp(sum(nll) / len(nll))
    assert score.details["perplexity"] == pytest.approx(perplexity, rel=1e-5)
    assert score.details["tokens"] == len(nll) == len(score.correct)
    assert score.score == pytest.approx(1 / perplexity, rel=1e-5)


def test_perplexity_counts_only_completion_tokens(family):
    records = [{"prompt": "The answer is", "completion": " yes"}]
    score = family.score_task(_task(records), trained=True, batch_size=4)
    completion = family.tokenizer(" yes", add_special_tokens=False)["input_ids"]
    assert score.details["tokens"] == len(completion) + 1  # + the end token


def test_greedy_batched_equals_transformers_generate_one_by_one(family):
    prompts = [family.tokenizer(p)["input_ids"] for p in ["a", "the dog is a kind of", "rain"]]
    ours = family.greedy(prompts, max_new_tokens=6, batch_size=3)
    eos = family.tokenizer.eos_token_id
    for prompt, mine in zip(prompts, ours, strict=True):
        out = family.backbone.generate(input_ids=torch.tensor([prompt]), max_new_tokens=6,
                                       do_sample=False, eos_token_id=eos, pad_token_id=eos)
        theirs = out[0, len(prompt):].tolist()
        theirs = theirs[: theirs.index(eos)] if eos in theirs else theirs
        assert mine == theirs
    assert any(ours)  # not vacuous: something was generated


def test_exact_match_scorer_scores_per_question(family, monkeypatch):
    records = [{"question": "What is a dog?", "answer": "animal"},
               {"question": "What is rain?", "answer": "water"}]
    answers = {0: " an Animal.", 1: " fire"}
    calls = []

    def fake_greedy(prompts, max_new_tokens, batch_size):
        calls.append(max_new_tokens)
        tok = family.tokenizer
        return [tok(answers[i], add_special_tokens=False)["input_ids"]
                for i in range(len(prompts))]

    monkeypatch.setattr(family, "greedy", fake_greedy)
    score = family.score_task(_task(records, "exact_match"), trained=True, batch_size=4)
    assert score.correct.tolist() == [True, False] and score.score == 0.5
    assert calls == [family.cfg.max_new_tokens]


# -- LwF's vocabulary distillation -----------------------------------------------------------------


def test_lwf_top_k_cache_size_and_content(family):
    records = [{"prompt": "a dog", "completion": " barks"}, {"text": "rain falls"},
               {"question": "q?", "answer": "a b c"}]
    task = _task(records)
    k, temperature = 4, 2.0
    cache = TokenCache(*family.token_top_k(task, k, temperature, batch_size=2))
    n_tokens = sum(sum(mask[1:]) for mask in (family.encode(r)[1] for r in records))
    assert int(cache.offsets[-1]) == n_tokens
    assert cache.indices.shape == (n_tokens, k) and cache.indices.dtype == torch.int32
    assert cache.logp.shape == (n_tokens, k) and cache.rest.shape == (n_tokens,)
    assert cache.nbytes == n_tokens * (4 * k + 4 * k + 4)  # not n_tokens × vocabulary
    # Example 1's rows are its own tokens' distributions, in order.
    ids, mask = family.encode(records[1])
    with torch.no_grad():
        logits = family.backbone(input_ids=torch.tensor([ids]))[0][0]
    log_p = F.log_softmax(logits[:-1] / temperature, dim=-1)
    rows = cache.rows(torch.tensor([1]))
    top, index = log_p.topk(k, dim=-1)
    torch.testing.assert_close(cache.logp[rows], top)
    assert torch.equal(cache.indices[rows].long(), index)
    rest = torch.logsumexp(log_p.scatter(-1, index, float("-inf")), dim=-1)
    torch.testing.assert_close(cache.rest[rows], rest)


def test_lwf_top_k_above_the_vocabulary_keeps_the_whole_distribution(family):
    task = _task([{"text": "rain falls"}])
    vocab = family.backbone.get_output_embeddings().weight.shape[0]
    cache = TokenCache(*family.token_top_k(task, vocab + 50, 1.0, batch_size=2))
    assert cache.indices.shape[1] == vocab
    assert torch.isinf(cache.rest).all()  # nothing is left outside the kept tokens
    torch.testing.assert_close(cache.logp.exp().sum(-1), torch.ones(len(cache.rest)))


def test_top_k_distillation_loss_is_the_kl_of_the_grouped_distributions():
    torch.manual_seed(0)
    vocab, temperature, alpha = 10, 2.0, 1.5
    teacher, student = torch.randn(5, vocab), torch.randn(5, vocab)
    log_p = F.log_softmax(teacher / temperature, dim=-1)
    full = alpha * temperature**2 * F.kl_div(F.log_softmax(student / temperature, dim=-1),
                                             log_p, reduction="batchmean", log_target=True)

    def grouped(k):
        top, index = log_p.topk(k, dim=-1)
        rest = torch.logsumexp(log_p.scatter(-1, index, float("-inf")), dim=-1)
        return top_k_distillation_loss(student, index, top, rest, alpha, temperature)

    torch.testing.assert_close(grouped(vocab), full)  # k = V: the full-vocabulary KL
    assert 0 < float(grouped(3)) <= float(full) + 1e-6  # grouping never adds divergence
    top, index = log_p.topk(3, dim=-1)
    rest = torch.logsumexp(log_p.scatter(-1, index, float("-inf")), dim=-1)
    same = top_k_distillation_loss(teacher, index, top, rest, alpha, temperature)
    assert abs(float(same)) < 1e-6  # the teacher against itself


# -- configs and data errors ---------------------------------------------------------------------


def _lm_config(tiny_llama, tmp_path, tasks, **extra) -> dict:
    return {"name": "lm", "model": {"family": "causal_lm", "name_or_path": str(tiny_llama),
                                    "max_length": 48},
            "lora": {"r": 2}, "train": {"lr": 1e-2, "batch_size": 4, "max_steps": 2,
                                        "eval_batch_size": 8},
            "upstream": {"kind": "general_text", "size": 10}, "tasks": tasks,
            "output_dir": str(tmp_path / "runs"), **extra}


def _jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


@pytest.mark.parametrize("change, message", [
    ({"tasks": [{"name": "a", "wordnet": ["noun.animal", "noun.plant"]}]},
     r"wordnet: not a data source of a causal_lm model; it takes train, facts"),
    ({"upstream": {"kind": "text_file"}}, "upstream.file is needed"),
    ({"upstream": {"kind": "wordnet_retrieval"}},
     "'wordnet_retrieval' does not score a causal_lm model; use general_text or text_file"),
    ({"tasks": [{"name": "a", "facts": 1, "scorer": "accuracy"}]}, "exact_match or perplexity"),
])
def test_config_errors_name_the_field(tiny_llama, tmp_path, change, message):
    data = _lm_config(tiny_llama, tmp_path, [{"name": "a", "facts": 1}])
    data.update(change)
    with pytest.raises(ConfigError, match=message):
        load_run_config(None, data=data)


def test_classifier_refuses_lm_only_settings(tiny_bert):
    with pytest.raises(ConfigError, match="facts: not a data source of a classifier model"):
        load_run_config(None, data={"model": {"name_or_path": str(tiny_bert)},
                                    "tasks": [{"name": "a", "facts": 1}]})


@pytest.mark.parametrize("train_rows, eval_rows, message", [
    ([{"question": "q", "answer": "a"}], [{"text": "t"}], "in format 'qa' and the held-out"),
    ([{"body": "x"}], [{"body": "x"}], "fit no causal-LM format"),
    ([{"question": "q", "answer": ""}], [{"question": "q", "answer": "a"}],
     r"row 1: `answer` is empty"),
    ([{"messages": [{"role": "user", "content": "hi"}]}],
     [{"messages": [{"role": "user", "content": "hi"}]}], "no assistant turn"),
    ([{"messages": [{"role": "robot", "content": "hi"}]}],
     [{"messages": [{"role": "user", "content": "hi"}]}], r"messages\[0\] must be"),
])
def test_bad_lm_data_is_named(tiny_llama, tmp_path, train_rows, eval_rows, message):
    from continual_lora.sequence import load_sequence

    tasks = [{"name": "a", "train": _jsonl(tmp_path / "train.jsonl", train_rows),
              "eval": _jsonl(tmp_path / "eval.jsonl", eval_rows)}]
    cfg = load_run_config(None, data=_lm_config(tiny_llama, tmp_path, tasks))
    with pytest.raises(ConfigError, match=message) as err:
        load_sequence(cfg)
    assert "tasks.0 (a)" in str(err.value)


def test_prompt_longer_than_max_length_is_named(family):
    long = {"prompt": "word " * 200, "completion": " end"}
    with pytest.raises(ConfigError, match="no token to learn within model.max_length 64"):
        family.collate([(1, 0)], {1: _task([long])})


# -- every strategy, end to end -------------------------------------------------------------------


@pytest.mark.parametrize("name", strategy_names())
def test_every_strategy_trains_saves_and_reloads_on_a_causal_lm(name, tiny_llama, tmp_path):
    from continual_lora.evaluate import evaluate_run, rows_match
    from continual_lora.runner import run

    tasks = [{"name": "r1", "facts": 1, "facts_per_round": 6},
             {"name": "r2", "facts": 2, "facts_per_round": 6}]
    cfg = load_run_config(None, data=_lm_config(tiny_llama, tmp_path, tasks,
                                                strategy={"name": name}))
    result = run(cfg, echo=lambda _: None)
    assert result.R.shape == (3, 2) and np.isfinite(result.R).all()
    assert np.isfinite(result.U).all() and (result.U > 0).all()
    results = json.loads((result.run_dir / "results.json").read_text())
    assert results["scorers"] == ["exact_match", "exact_match"]
    assert results["upstream_details"][0]["perplexity"] == pytest.approx(1 / result.U[0])
    # What was saved is what was measured: reload the last stage with plain PEFT and rescore.
    row, recorded, stage = evaluate_run(result.run_dir)
    assert stage == 2 and rows_match(row, recorded)
    export = json.loads((result.run_dir / "tasks" / "02-r2" / "stage.json").read_text())["export"]
    # A rank-truncated (SVD) export approximates the dense merge it was scored with.
    lossy = export.get("kind") == "peft_lora_svd" and export["relative_error"]["max"] > 1e-4
    assert row.upstream == pytest.approx(result.U[-1], rel=1e-2 if lossy else 1e-5)
    if name == "lwf":  # the vocabulary term: none on task 1, present on task 2
        steps = [json.loads(line) for line in (result.run_dir / "log.jsonl").open()
                 if '"step"' in line]
        assert all(s["extra_loss"] is None for s in steps if s["task"] == "r1")
        assert any(s["extra_loss"] and s["extra_loss"] > 0 for s in steps if s["task"] == "r2")


def test_generate_cli_answers_with_the_run_adapter(tiny_llama, tmp_path, capsys):
    from continual_lora.cli import main
    from continual_lora.generate import generate, load_for_generation
    from continual_lora.runner import run

    tasks = [{"name": "r1", "facts": 1, "facts_per_round": 6}]
    cfg = load_run_config(None, data=_lm_config(tiny_llama, tmp_path, tasks))
    result = run(cfg, echo=lambda _: None)
    assert main(["generate", "--adapter", str(result.run_dir), "--prompt", "What is a dog?",
                 "--qa", "--max-new-tokens", "5"]) == 0
    out = capsys.readouterr().out
    assert out.startswith(">>> What is a dog?\n")
    # HF generate through the reloaded adapter = the family's own greedy decoding in the run.
    loaded = load_for_generation(result.run_dir, None)
    answer = generate(loaded, ["What is a dog?"], max_new_tokens=5, qa=True)[0]
    family = result.family
    prompt = family.tokenizer("Question: What is a dog?\nAnswer:")["input_ids"]
    ours = family.tokenizer.decode(family.greedy([prompt], 5, 1)[0], skip_special_tokens=True)
    assert answer == ours
    assert answer in out
