"""Config validation: unknown keys, wrong types and impossible values name the field."""

from pathlib import Path

import pytest

from continual_lora.config import (
    ConfigError,
    load_bench_config,
    load_run_config,
    parse_overrides,
)

ROOT = Path(__file__).resolve().parents[1]
TASKS = [{"name": "a", "wordnet": ["noun.animal", "noun.plant"]}]


def test_overrides_parse_yaml_scalars():
    assert parse_overrides(["train.lr=1e-4", "lora.r=4", "model.normalize=false",
                            "lora.target_modules=[query, value]"]) == {
        "train": {"lr": 1e-4}, "lora": {"r": 4, "target_modules": ["query", "value"]},
        "model": {"normalize": False}}


@pytest.mark.parametrize("bad", ["train.lr", "=3", "train..lr=1", "train.lr=[1,"])
def test_malformed_override_is_an_error(bad):
    with pytest.raises(ConfigError, match="override"):
        parse_overrides([bad])


def test_override_beats_file(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("train: {lr: 0.001}\ntasks: [{name: a, wordnet: [noun.animal, noun.plant]}]\n")
    cfg = load_run_config(path, ["train.lr=1e-4", "lora.r=4"])
    assert cfg.train.lr == 1e-4 and cfg.lora.r == 4 and cfg.lora.effective_alpha == 8.0


@pytest.mark.parametrize("overrides, field, words", [
    (["train.lrr=1"], "train.lrr", "unknown key"),
    (["train.lr=fast"], "train.lr", "valid number"),
    (["train.lr=-1"], "train.lr", "greater than 0"),
    (["lora.r=0"], "lora.r", "greater than or equal to 1"),
    (["train.batch_size=2.5"], "train.batch_size", "integer"),
    (["model.head=both"], "model.head", "per_task"),
    (["upstream.kind=imagenet"], "upstream.kind", "wordnet_retrieval"),
    (["colour=red"], "colour", "unknown key"),
])
def test_invalid_values_name_the_field(overrides, field, words):
    with pytest.raises(ConfigError) as info:
        load_run_config(None, overrides, data={"tasks": TASKS})
    message = str(info.value)
    assert f"{field}:" in message and words in message


def test_task_needs_a_source_and_both_files():
    with pytest.raises(ConfigError, match=r"tasks\.0.*a task needs"):
        load_run_config(None, data={"tasks": [{"name": "a"}]})
    with pytest.raises(ConfigError, match=r"tasks\.0.*`eval` is missing"):
        load_run_config(None, data={"tasks": [{"name": "a", "train": "x.csv"}]})
    with pytest.raises(ConfigError, match="unique"):
        load_run_config(None, data={"tasks": TASKS + TASKS})


def test_unknown_strategy_and_bad_strategy_options():
    with pytest.raises(ConfigError, match=r"strategy.name: unknown strategy 'nope'.*naive"):
        load_run_config(None, ["strategy.name=nope"], data={"tasks": TASKS})
    with pytest.raises(ConfigError, match=r"strategy.options.*buffer_sz: unknown key"):
        load_run_config(None, ["strategy.name=replay", "strategy.options.buffer_sz=3"],
                        data={"tasks": TASKS})
    with pytest.raises(ConfigError, match=r"buffer_size: Input should be greater than or equal"):
        load_run_config(None, ["strategy.name=replay", "strategy.options.buffer_size=0"],
                        data={"tasks": TASKS})


def test_yaml_that_is_not_a_mapping(tmp_path):
    path = tmp_path / "list.yaml"
    path.write_text("- a\n- b\n")
    with pytest.raises(ConfigError, match=r"list.yaml: the top level must be a mapping.*list"):
        load_run_config(path)
    with pytest.raises(ConfigError, match="config file not found"):
        load_run_config(tmp_path / "missing.yaml")


def test_relative_paths_resolve_against_the_config_folder(tmp_path):
    path = tmp_path / "sub" / "c.yaml"
    path.parent.mkdir()
    path.write_text("tasks: [{name: a, train: data/t.csv, eval: data/e.csv}]\n")
    cfg = load_run_config(path)
    assert cfg.resolve_path(cfg.tasks[0].train) == tmp_path / "sub" / "data" / "t.csv"


def _all_config_files():
    return sorted((ROOT / "configs").glob("*.yaml")) + sorted(
        (ROOT / "src" / "continual_lora" / "presets").glob("*.yaml")) + sorted(
        (ROOT / "examples").glob("*/*.yaml"))


@pytest.mark.parametrize("path", _all_config_files(), ids=lambda p: p.name)
def test_every_shipped_yaml_validates(path):
    import yaml

    data = yaml.safe_load(path.read_text())
    if "strategies" in data:
        cfg = load_bench_config(path)
        assert cfg.strategies
    else:
        cfg = load_run_config(path)
        assert cfg.tasks


def test_there_are_shipped_configs():
    names = {p.name for p in _all_config_files()}
    assert "demo.yaml" in names and len(names) >= 3


@pytest.mark.parametrize("overrides, alpha", [
    (["lora.r=4"], 8.0),  # default rule 2r
    (["lora.r=4", "lora.alpha_rule=r"], 4.0),
    (["lora.r=4", "lora.alpha=32"], 32.0),  # an explicit alpha is fixed
    (["lora.r=4", "lora.alpha=32", "lora.alpha_rule=fixed"], 32.0),
])
def test_alpha_follows_the_rule(overrides, alpha):
    cfg = load_run_config(None, overrides, data={"tasks": TASKS})
    assert cfg.lora.effective_alpha == alpha


@pytest.mark.parametrize("overrides, words", [
    (["lora.alpha_rule=fixed"], "needs lora.alpha"),
    (["lora.alpha=16", "lora.alpha_rule=r"], "contradicts alpha_rule 'r'"),
])
def test_alpha_rule_conflicts_are_errors(overrides, words):
    with pytest.raises(ConfigError, match="lora") as info:
        load_run_config(None, overrides, data={"tasks": TASKS})
    assert words in str(info.value)


def test_rank_sweep_keeps_the_alpha_rule():
    from continual_lora.bench import plan_rows, row_config

    def alphas(lora: dict) -> dict:
        bench = load_bench_config(None, data={
            "strategies": [{"name": "naive"}, {"name": "full_ft"}], "ranks": [1, 4],
            "include_joint": False, "run": {"tasks": TASKS, "lora": lora}})
        rows = {row_config(bench, s, r).name: row_config(bench, s, r).lora
                for s, r in plan_rows(bench)}
        assert list(rows) == ["naive-r1", "naive-r4", "full_ft"]  # no LoRA: one row
        return {name: lora.effective_alpha for name, lora in rows.items() if name != "full_ft"}

    assert alphas({}) == {"naive-r1": 2.0, "naive-r4": 8.0}
    assert alphas({"alpha_rule": "r"}) == {"naive-r1": 1.0, "naive-r4": 4.0}
    assert alphas({"alpha": 8}) == {"naive-r1": 8.0, "naive-r4": 8.0}

