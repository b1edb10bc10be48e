"""The bench's comparison table, built from run results (pure: no training)."""


def test_comparison_table_shows_strategy_reports_only_when_there_are_some(tmp_path):
    import numpy as np

    from continual_lora.bench import comparison_rows, format_table
    from continual_lora.runner import RunResult

    def result(strategy: str, report: dict | None) -> RunResult:
        metrics = {"acc": 0.5, "forgetting": 0.1, "bwt": -0.1, "fwt": 0.0, "plasticity": 0.6,
                   "upstream_retention": 0.9}
        if report is not None:
            metrics["strategy_report"] = report
        return RunResult(tmp_path, np.zeros((3, 2)), np.zeros(3), metrics, 10, 1.0, strategy, 2)

    plain = format_table(comparison_rows([result("naive", None)]))
    assert "Strategy report" not in plain
    moe = {"router": "prototype", "routing_accuracy": {"a": 0.5, "b": 1.0},
           "routing_accuracy_mean": 0.75}
    merge = {"export_error": {"mean": 0.125, "max": 0.5}}
    table = format_table(comparison_rows([result("naive", None), result("moe", moe),
                                          result("merge", merge)]))
    lines = table.splitlines()
    assert lines[0].endswith("| Strategy report |")
    assert lines[2].endswith("| 1 |  |")  # naive: empty cell
    assert lines[3].endswith("| router prototype; routing_accuracy_mean 0.750 |")
    assert lines[4].endswith("| export_error mean 0.125 |")


def test_labels_name_rows_of_one_strategy_under_several_options():
    import pytest

    from continual_lora.bench import plan_rows, row_config
    from continual_lora.config import ConfigError, load_bench_config

    run = {"tasks": [{"name": "a", "wordnet": ["noun.animal", "noun.plant"]}]}
    bench = load_bench_config(None, data={
        "strategies": [{"name": "full_ft"},
                       {"name": "full_ft", "label": "full_ft_replay",
                        "options": {"replay": True}}],
        "include_joint": False, "run": run})
    names = [row_config(bench, s, r).name for s, r in plan_rows(bench)]
    assert names == ["full_ft", "full_ft_replay"]
    with pytest.raises(ConfigError, match=r"\['full_ft'\] appear more than once: give each a "
                                          "distinct `label`"):
        load_bench_config(None, data={"strategies": [{"name": "full_ft"}, {"name": "full_ft"}],
                                      "run": run})
