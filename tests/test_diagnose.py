"""`continual-lora diagnose`: the measures against hand-computed values, the task vector of each
kind of stage export, the diagnosis of hand-made adapters (identical, opposite, orthogonal),
the command on a tiny run and bench (files, report section, CKA), and its errors."""

from __future__ import annotations

import json
import math

import pytest
import torch
import yaml
from safetensors.torch import save_file

from continual_lora.adapter_files import write_adapter
from continual_lora.adapters import LoraFactors
from continual_lora.cli import main
from continual_lora.diagnose import measures, verdict
from continual_lora.diagnose.analysis import analyse, layer_labels, layer_of, summarise
from continual_lora.diagnose.base_weights import base_square_norms
from continual_lora.diagnose.command import DiagnoseOptions, diagnose
from continual_lora.diagnose.task_vectors import (
    DiagnoseError,
    adapter_list_vectors,
    read_run_folder,
    run_task_vectors,
)

Q = "encoder.layer.0.attention.self.query"
V = "encoder.layer.1.attention.self.value"


def _orthonormal(rows: int, d: int, seed: int) -> torch.Tensor:
    """`rows` orthonormal columns in R^d."""
    generator = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(d, rows, generator=generator, dtype=torch.float64))
    return q


# -- the measures, by hand -------------------------------------------------------------------


def test_opposed_ratio_and_cosine_of_two_2x2_matrices_by_hand():
    earlier = torch.tensor([[1.0, -2.0], [3.0, 0.0]])
    later = torch.tensor([[2.0, 1.0], [-1.0, 5.0]])
    # Entries (0,1) and (1,0) oppose; (1,1) does not count (earlier is 0 there).
    assert measures.opposed_ratio(earlier, later) == pytest.approx(math.sqrt(2 / 31))
    # ⟨a, b⟩ = 2 − 2 − 3 + 0 = −3, ‖a‖² = 14, ‖b‖² = 31
    assert measures.cosine(earlier, later) == pytest.approx(-3 / math.sqrt(14 * 31))


def test_opposed_ratio_identical_opposite_and_unrelated():
    generator = torch.Generator().manual_seed(0)
    tau = torch.randn(64, 48, generator=generator)
    assert measures.opposed_ratio(tau, tau) == 0.0
    assert measures.opposed_ratio(tau, -tau) == pytest.approx(1.0)
    assert measures.cosine(tau, -tau) == pytest.approx(-1.0)
    # Independent signs: half the squared norm opposes, so the ratio of norms is √½.
    first, second = torch.randn(2, 300, 300, generator=generator)
    assert measures.opposed_ratio(first, second) == pytest.approx(measures.CHANCE_OPPOSED,
                                                                  abs=0.01)
    assert math.isnan(measures.opposed_ratio(tau, torch.zeros_like(tau)))


def test_subspace_overlap_at_a_known_angle_is_cos_squared():
    theta = 0.3
    e = torch.eye(3, dtype=torch.float64)
    U = e[:, :1]
    V = (math.cos(theta) * e[:, 0] + math.sin(theta) * e[:, 1]).reshape(3, 1)
    assert measures.subspace_overlap(U, V) == pytest.approx(math.cos(theta) ** 2)
    # Two planes sharing e1, the other directions at angle θ: mean of cos² 0 and cos² θ.
    U2 = e[:, :2]
    V2 = torch.stack([e[:, 0], math.cos(theta) * e[:, 1] + math.sin(theta) * e[:, 2]], dim=1)
    assert measures.subspace_overlap(U2, V2) == pytest.approx((1 + math.cos(theta) ** 2) / 2)
    assert measures.subspace_overlap(U2, e[:, 2:]) == pytest.approx(0.0)
    assert measures.subspace_overlap(U2, U2) == pytest.approx(1.0)


def test_random_subspaces_overlap_about_chance():
    d, p = 200, 4
    values = [measures.subspace_overlap(_orthonormal(p, d, 2 * k), _orthonormal(p, d, 2 * k + 1))
              for k in range(200)]
    assert sum(values) / len(values) == pytest.approx(measures.chance_overlap(p, p, d), rel=0.15)
    assert measures.chance_overlap(4, 8, 200) == pytest.approx(8 / 200)


def test_factored_subspaces_match_the_dense_svd_and_the_rows_of_A():
    generator = torch.Generator().manual_seed(1)
    B, A = torch.randn(40, 3, generator=generator), torch.randn(3, 50, generator=generator)
    factored = measures.Factored.of(2.0 * B, A)
    out_f, in_f = measures.factored_subspaces(factored, 3)
    out_d, in_d = measures.dense_subspaces(factored.dense(), 3)
    assert torch.allclose(out_f @ out_f.T, out_d @ out_d.T, atol=1e-10)
    assert torch.allclose(in_f @ in_f.T, in_d @ in_d.T, atol=1e-10)
    # The input side of s·B·A (B of full rank) is the row space of A.
    rows_of_A, _ = torch.linalg.qr(A.double().T)
    assert measures.subspace_overlap(in_f, rows_of_A) == pytest.approx(1.0)
    # A difference whose earlier part cancels exactly keeps only the new part's rank.
    B2, A2 = torch.randn(40, 3, generator=generator), torch.randn(3, 50, generator=generator)
    cumulative = measures.Factored.of(torch.cat([B, B2], 1), torch.cat([A, A2], 0))
    out_c, in_c = measures.factored_subspaces(cumulative.minus(measures.Factored.of(B, A)), 6)
    assert in_c.shape[1] == 3
    rows_of_A2, _ = torch.linalg.qr(A2.double().T)
    assert measures.subspace_overlap(in_c, rows_of_A2) == pytest.approx(1.0)


def test_linear_cka_by_hand_and_invariances():
    generator = torch.Generator().manual_seed(2)
    X = torch.randn(100, 16, generator=generator, dtype=torch.float64)
    assert measures.linear_cka(X, X) == pytest.approx(1.0)
    rotation = _orthonormal(16, 16, 3)
    assert measures.linear_cka(X, X @ rotation) == pytest.approx(1.0)
    assert measures.linear_cka(X, 3.0 * X @ rotation + 5.0) == pytest.approx(1.0)
    # Two centred, uncorrelated columns of equal variance; Y keeps the first only:
    # ‖YᵀX‖² = a², ‖XᵀX‖ = a√2, ‖YᵀY‖ = a  →  CKA = 1/√2.
    X2 = torch.tensor([[1.0, 1.0], [1.0, -1.0], [-1.0, 1.0], [-1.0, -1.0]])
    Y2 = X2 * torch.tensor([1.0, 0.0])
    assert measures.linear_cka(X2, Y2) == pytest.approx(1 / math.sqrt(2))


def test_relative_norm_and_spearman_by_hand():
    assert measures.relative_norm(torch.tensor([[3.0, 4.0]]), torch.tensor([[0.0, 10.0]])) == 0.5
    assert measures.spearman([1, 2, 3], [3, 2, 1]) == pytest.approx(-1.0)
    # ties share their mean rank: ranks (1, 2.5, 2.5, 4) and (1, 3, 2, 4) → 4.5 / √(4.5 · 5)
    assert measures.spearman([1, 2, 2, 3], [1, 3, 2, 4]) == pytest.approx(4.5 / math.sqrt(22.5))
    assert math.isnan(measures.spearman([1, 1, 1], [1, 2, 3]))


def test_layers_of_modules():
    assert layer_of(Q) == "encoder.layer.0"
    assert layer_of("pooler.dense") == "pooler"
    assert layer_of("model.layers.12.mlp.down_proj") == "model.layers.12"
    assert layer_labels(["encoder.layer.0", "encoder.layer.10", "pooler"]) == ["0", "10", "pooler"]
    assert layer_labels(["down_blocks.0", "up_blocks.1"]) == ["down_blocks.0", "up_blocks.1"]


# -- hand-made adapters ----------------------------------------------------------------------------


def _adapter(folder, factors: dict[str, tuple[torch.Tensor, torch.Tensor]], base="tiny-base"):
    """A PEFT LoRA folder holding exactly ΔW = B @ A per module (scaling folded, as the
    strategies' exports write it)."""
    write_adapter({m: LoraFactors(A=A.clone(), B=B.clone(), scaling=1.0)
                   for m, (B, A) in factors.items()}, folder, base)
    return folder


def _random_factors(seed: int, r: int = 2, d_out: int = 8, d_in: int = 8):
    generator = torch.Generator().manual_seed(seed)
    return {m: (torch.randn(d_out, r, generator=generator),
                torch.randn(r, d_in, generator=generator)) for m in (Q, V)}


def test_identical_adapters_overlap_1_and_oppose_0(tmp_path):
    factors = _random_factors(0)
    a, b = _adapter(tmp_path / "a", factors), _adapter(tmp_path / "b", factors)
    result = analyse(adapter_list_vectors([a, b], cumulative=False))
    (pair,) = result["pairs"]
    assert pair["opposed_ratio"] == 0.0
    assert pair["cosine"] == pytest.approx(1.0)
    assert pair["overlap_input"] == pytest.approx(1.0)
    assert pair["overlap_output"] == pytest.approx(1.0)
    assert pair["per_layer"]["overlap_input"] == pytest.approx([1.0, 1.0])


def test_exactly_opposite_adapters_oppose_1(tmp_path):
    factors = _random_factors(1)
    opposite = {m: (-B, A) for m, (B, A) in factors.items()}
    a, b = _adapter(tmp_path / "a", factors), _adapter(tmp_path / "b", opposite)
    (pair,) = analyse(adapter_list_vectors([a, b], cumulative=False))["pairs"]
    assert pair["opposed_ratio"] == pytest.approx(1.0)
    assert pair["cosine"] == pytest.approx(-1.0)
    assert pair["overlap_input"] == pytest.approx(1.0)  # the same subspaces, opposite signs


def test_orthogonal_subspaces_overlap_0(tmp_path):
    eye = torch.eye(8)
    # Task a writes rows/columns 0-1, task b rows/columns 4-5: orthogonal on both sides.
    a_factors = {m: (eye[:, :2] * 3.0, eye[:2] * 0.5) for m in (Q, V)}
    b_factors = {m: (eye[:, 4:6] * 2.0, eye[4:6]) for m in (Q, V)}
    a, b = _adapter(tmp_path / "a", a_factors), _adapter(tmp_path / "b", b_factors)
    (pair,) = analyse(adapter_list_vectors([a, b], cumulative=False))["pairs"]
    assert pair["overlap_input"] == pytest.approx(0.0, abs=1e-12)
    assert pair["overlap_output"] == pytest.approx(0.0, abs=1e-12)
    assert pair["chance_overlap_input"] == pytest.approx(2 / 8)
    assert pair["cosine"] == pytest.approx(0.0)  # disjoint entries
    assert pair["opposed_ratio"] == 0.0


def test_a_hand_computed_pair_through_the_adapter_files(tmp_path):
    """The 2×2 matrices of the first test as the updates of two adapter folders (rank 2:
    B = ΔW, A = I), through reading, task vectors and the per-pair analysis."""
    earlier, later = torch.tensor([[1.0, -2.0], [3.0, 0.0]]), torch.tensor([[2.0, 1.0],
                                                                            [-1.0, 5.0]])
    a = _adapter(tmp_path / "a", {Q: (earlier, torch.eye(2))})
    b = _adapter(tmp_path / "b", {Q: (later, torch.eye(2))})
    (pair,) = analyse(adapter_list_vectors([a, b], cumulative=False))["pairs"]
    assert pair["opposed_ratio"] == pytest.approx(math.sqrt(2 / 31))
    assert pair["cosine"] == pytest.approx(-3 / math.sqrt(14 * 31))
    assert pair["overlap_input"] == pytest.approx(1.0)  # both span R²


def _fake_run(root, strategy: str, stages: list[dict], kind: str, base="tiny-base"):
    """A run folder as the runner lays it out: config.yaml and tasks/NN-name/{adapter,
    stage.json}, the stage adapters holding the given factors."""
    root.mkdir(parents=True)
    (root / "config.yaml").write_text(yaml.safe_dump({"strategy": {"name": strategy},
                                                      "lora": {"r": 2}}))
    for index, factors in enumerate(stages, start=1):
        stage = root / "tasks" / f"{index:02d}-t{index}"
        _adapter(stage / "adapter", factors, base)
        (stage / "stage.json").write_text(json.dumps({"task": f"t{index}", "index": index,
                                                      "export": {"kind": kind}}))
    return root


def test_naive_stage_adapters_are_differenced(tmp_path):
    first, second = _random_factors(2), _random_factors(3)
    run = _fake_run(tmp_path / "run", "naive", [first, second], "peft_lora")
    vectors = run_task_vectors(read_run_folder(run))
    assert vectors.definition == "cumulative_difference"
    assert vectors.tasks == ["t1", "t2"]
    assert vectors.ranks == [2, 2]
    for module in (Q, V):
        (B1, A1), (B2, A2) = first[module], second[module]
        assert torch.allclose(vectors.updates[0][module].dense(), (B1 @ A1).double())
        assert torch.allclose(vectors.updates[1][module].dense(), (B2 @ A2 - B1 @ A1).double(),
                              atol=1e-6)


def test_merged_stage_adapters_give_each_task_its_own_adapter(tmp_path):
    """merge_reinit's stage t adapter is the concatenation of tasks 1..t: the difference is
    task t's own B_t A_t, of rank r (not the stage's 2r)."""
    own1, own2 = _random_factors(4), _random_factors(5)
    stage2 = {m: (torch.cat([own1[m][0], own2[m][0]], 1), torch.cat([own1[m][1], own2[m][1]], 0))
              for m in (Q, V)}
    run = _fake_run(tmp_path / "run", "merge_reinit", [own1, stage2], "peft_lora_concatenated")
    vectors = run_task_vectors(read_run_folder(run))
    assert vectors.definition == "cumulative_difference_merged"
    assert vectors.ranks == [2, 2]
    B2, A2 = own2[Q]
    assert torch.allclose(vectors.updates[1][Q].dense(), (B2 @ A2).double(), atol=1e-6)
    _, inputs = measures.factored_subspaces(vectors.updates[1][Q], 2)
    rows_of_A2, _ = torch.linalg.qr(A2.double().T)
    assert measures.subspace_overlap(inputs, rows_of_A2) == pytest.approx(1.0)


def test_joint_and_svd_exports_name_their_definition(tmp_path):
    stages = [_random_factors(6), _random_factors(7)]
    joint = run_task_vectors(read_run_folder(_fake_run(tmp_path / "j", "joint", stages,
                                                       "peft_lora")))
    svd = run_task_vectors(read_run_folder(_fake_run(tmp_path / "m", "magmax", stages,
                                                     "peft_lora_svd")))
    assert joint.definition == "retrained_difference"
    assert "not what task t alone taught" in joint.explanation
    assert svd.definition == "svd_export_difference"


def test_cumulative_adapter_list_is_differenced(tmp_path):
    first, second = _random_factors(8), _random_factors(9)
    a, b = _adapter(tmp_path / "a", first), _adapter(tmp_path / "b", second)
    vectors = adapter_list_vectors([a, b], cumulative=True)
    assert vectors.definition == "cumulative_adapters"
    (B1, A1), (B2, A2) = first[Q], second[Q]
    assert torch.allclose(vectors.updates[1][Q].dense(), (B2 @ A2 - B1 @ A1).double(), atol=1e-6)


def test_relative_norms_from_a_base_checkpoint_with_a_prefix(tmp_path):
    """W0 is found under a model prefix (`bert.` + module) and ‖τ‖/‖W0‖ is per layer."""
    base = tmp_path / "base"
    base.mkdir()
    save_file({f"bert.{Q}.weight": torch.full((8, 8), 2.0),  # ‖W0‖² = 256
               f"bert.{V}.weight": torch.ones(8, 8)}, str(base / "model.safetensors"))
    assert base_square_norms(base, [Q, V, "pooler.dense"]) == {Q: 256.0, V: 64.0}
    eye = torch.eye(8)
    factors = {Q: (eye[:, :1] * 4.0, eye[:1]), V: (eye[:, :1], eye[:1] * 2.0)}  # ‖ΔW‖ 4 and 2
    a, b = _adapter(tmp_path / "a", factors), _adapter(tmp_path / "b", factors)
    vectors = adapter_list_vectors([a, b], cumulative=False)
    norms = analyse(vectors, base_square_norms(base, vectors.modules))["relative_norm"]
    assert norms["per_layer"][0] == pytest.approx([4 / 16, 2 / 8])
    assert norms["total"][0] == pytest.approx(math.sqrt(20 / 320))


def test_a_module_without_update_is_left_out_and_named(tmp_path):
    factors = _random_factors(10)
    silent = {Q: factors[Q], V: (torch.zeros(8, 2), factors[V][1])}
    a, b = _adapter(tmp_path / "a", factors), _adapter(tmp_path / "b", silent)
    result = analyse(adapter_list_vectors([a, b], cumulative=False))
    assert result["modules_without_update"] == {V: ["b"]}
    (pair,) = result["pairs"]
    assert math.isnan(pair["per_layer"]["overlap_input"][1])
    assert pair["opposed_ratio"] == 0.0  # from the query module alone, identical in a and b
    assert summarise(result, None)["overlap_input_consecutive"] == pytest.approx(1.0)


# -- the verdict -----------------------------------------------------------------------------------


def _pair(i, j, overlap, opposed, cosine, chance=0.02):
    return {"i": i, "j": j, "tasks": [f"t{i}", f"t{j}"], "consecutive": j == i + 1,
            "opposed_ratio": opposed, "cosine": cosine, "overlap_input": overlap,
            "overlap_output": overlap / 2, "chance_overlap_input": chance,
            "chance_overlap_output": chance,
            "per_layer": {"overlap_input": [overlap - 0.1, overlap + 0.1, overlap + 0.05]}}


def test_run_verdict_describes_the_stage_that_forgot_and_advises():
    diagnosis = {"task_vectors": {"definition": "cumulative_difference"},
                 "tasks": ["t1", "t2", "t3"], "layers": ["0", "1", "2"],
                 "pairs": [_pair(1, 2, 0.03, 0.70, 0.0), _pair(2, 3, 0.8, 0.85, -0.3)],
                 "old_task_drop": [None, 0.01, 0.08], "metrics": {"forgetting": 0.05}}
    lines = verdict.run_verdict(diagnosis)
    assert lines[0] == "The earlier tasks lost most while t3 was trained (their mean score fell " \
                       "by 0.080)."
    assert "Tasks t2 and t3 share most of their input subspace (overlap 0.80, 40× chance, " \
           "highest at layers 1–2" in lines[1]
    assert "on 85% of its norm" in lines[1] and "t3 partly undoes t2" in lines[1]
    assert "an orthogonal strategy (ortho_init, olora) or a lower rank" in lines[2]
    # Where the earlier stage forgot, that stage's pair is described instead.
    diagnosis["old_task_drop"] = [None, 0.09, 0.0]
    lines = verdict.run_verdict(diagnosis)
    assert "write into nearly orthogonal input subspaces (overlap 0.03, 1.5× chance" in lines[1]
    assert "do not explain what is forgotten" in lines[2]


def test_bench_verdict_sorts_measures_by_what_they_show():
    def row(label, forgetting, overlap, opposed, cosine):
        return {"label": label, "strategy": label, "forgetting": forgetting,
                "overlap_input_consecutive": overlap, "overlap_output_consecutive": overlap / 3,
                "opposed_ratio_consecutive": opposed, "cosine_consecutive": cosine}

    rows = [row("naive", 0.06, 0.65, 0.703, -0.03), row("replay", 0.035, 0.60, 0.702, -0.015),
            row("merge_reinit", 0.02, 0.02, 0.708, 0.0), row("joint", 0.01, 0.4, 0.9, -0.5)]
    from continual_lora.diagnose.command import correlations

    lines = verdict.bench_verdict({"runs": rows, "correlations": correlations(rows)})
    assert lines[0] == "Forgetting, lowest first: merge_reinit 0.020, replay 0.035, naive 0.060."
    agree = next(x for x in lines if x.startswith("As seed 003 argues"))
    assert "mean input overlap (ρ = +1.00, spread 0.630)" in agree
    assert "mean cosine (ρ = -1.00, spread 0.030)" in agree
    # 0.702, 0.703, 0.708: each within 0.01 of the next, so all tied and not ranked
    weak = next(x for x in lines if x.startswith("No clear relation"))
    assert "mean opposed ratio (ρ undefined, spread 0.006: no real difference)" in weak
    assert "over 3 runs and 3 distinct levels of forgetting" in lines[-1]  # joint left out


def test_close_values_are_ranked_as_ties():
    assert measures.tie_close([0.028, 0.022, 0.067, 0.025], 0.01) == [0.022, 0.022, 0.067, 0.022]
    assert measures.tie_close([0.3, 0.1, 0.2], 0.01) == [0.3, 0.1, 0.2]


# -- errors ----------------------------------------------------------------------------------------


def test_folder_without_adapters_is_refused_naming_it(tmp_path, capsys):
    empty = tmp_path / "nothing-here"
    empty.mkdir()
    assert main(["diagnose", str(empty), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert str(empty) in err and "no LoRA adapters found" in err and "give the folder" in err


def test_adapters_with_other_targets_or_base_are_refused(tmp_path):
    factors = _random_factors(11)
    a = _adapter(tmp_path / "a", factors)
    other_targets = _adapter(tmp_path / "b", {Q: factors[Q]})
    with pytest.raises(DiagnoseError, match="adapt different target modules") as info:
        adapter_list_vectors([a, other_targets], cumulative=False)
    assert str(a) in str(info.value) and str(other_targets) in str(info.value)
    other_base = _adapter(tmp_path / "c", factors, base="another-base")
    with pytest.raises(DiagnoseError, match="different base models"):
        adapter_list_vectors([a, other_base], cumulative=False)


def test_a_single_task_is_refused(tmp_path):
    run = _fake_run(tmp_path / "run", "naive", [_random_factors(12)], "peft_lora")
    with pytest.raises(DiagnoseError, match="single task") as info:
        diagnose([run], DiagnoseOptions(drift=False))
    assert str(run) in str(info.value)
    with pytest.raises(DiagnoseError, match="single adapter"):
        diagnose([run / "tasks" / "01-t1" / "adapter"],
                 DiagnoseOptions(drift=False, out=tmp_path / "out"))


def test_adapter_folders_need_out(tmp_path, capsys):
    a = _adapter(tmp_path / "a", _random_factors(13))
    b = _adapter(tmp_path / "b", _random_factors(14))
    assert main(["diagnose", str(a), str(b)]) == 2
    assert "--out FOLDER" in capsys.readouterr().err
    assert main(["diagnose", str(a), str(b), "--out", str(tmp_path / "out")]) == 0
    saved = json.loads((tmp_path / "out" / "diagnosis.json").read_text())
    assert saved["task_vectors"]["definition"] == "independent_adapters"
    assert saved["drift"]["skipped"].startswith("adapter folders alone")
    assert (tmp_path / "out" / "figures" / "diagnosis_pairs.png").is_file()


# -- the command on tiny runs ----------------------------------------------------------------------


@pytest.fixture
def tiny_run(tiny_run_config, tmp_path):
    """A naive run of the tiny BERT over two tasks, with a 10-pair WordNet upstream probe."""
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(tiny_run_config(
        "naive", upstream={"kind": "wordnet_retrieval", "size": 10})))
    assert main(["run", str(path)]) == 0
    return tmp_path / "runs" / "tiny-naive"


def test_diagnose_a_run_writes_its_files_and_the_report_section(tiny_run, tiny_bert, capsys):
    assert "Diagnosis: why did it forget?" not in (tiny_run / "report.html").read_text()
    capsys.readouterr()
    assert main(["diagnose", str(tiny_run)]) == 0
    printed = capsys.readouterr().out
    assert "earlier → later task" in printed and "cumulative_difference" in printed
    saved = json.loads((tiny_run / "diagnosis.json").read_text())
    assert saved["tasks"] == ["a", "b"]
    assert saved["task_vectors"]["definition"] == "cumulative_difference"
    (pair,) = saved["pairs"]
    assert 0.0 <= pair["opposed_ratio"] <= 1.0 and -1.0 <= pair["cosine"] <= 1.0
    assert 0.0 <= pair["overlap_input"] <= 1.0 and 0.0 <= pair["overlap_output"] <= 1.0
    assert saved["layers"] == ["0", "1"]
    # the tiny BERT is a local folder: W0 is found and every task moved its layers a little
    assert all(0.0 < x < 1.0 for row in saved["relative_norm"]["per_layer"] for x in row)
    drift = saved["drift"]
    assert drift["texts"] == 20 and drift["stages"] == ["after a", "after b"]
    assert all(0.0 < c <= 1.0 + 1e-9 for row in drift["cka"] for c in row)
    assert saved["summary"]["cka_last_layer_after_last_task"] == drift["cka"][-1][-1]
    assert saved["verdict"] and saved["verdict"][-1].startswith("Forgetting of this run")
    for figure in ("diagnosis_pairs", "diagnosis_layer_norms", "diagnosis_drift"):
        assert (tiny_run / "figures" / f"{figure}.png").is_file()
    assert (tiny_run / "diagnosis.md").read_text().startswith("# Diagnosis: naive")
    page = (tiny_run / "report.html").read_text()
    assert "Diagnosis: why did it forget?" in page
    assert 'data-file="figures/diagnosis_pairs.png"' in page


def test_cka_of_a_stage_is_recomputed_by_hand(tiny_run, tiny_bert):
    """The drift of stage 1 against a forward pass written here: base and base + adapter (PEFT),
    last layer, mean pooled and normalised as the classifier pools."""
    import torch.nn.functional as F
    from peft import PeftModel
    from transformers import AutoModel, AutoTokenizer

    from continual_lora.sequence import wordnet_upstream

    assert main(["diagnose", str(tiny_run)]) == 0
    saved = json.loads((tiny_run / "diagnosis.json").read_text())
    probe, _ = wordnet_upstream(10)
    texts = probe.queries + probe.keys
    tokenizer = AutoTokenizer.from_pretrained(tiny_bert)
    batch = tokenizer(texts, padding=True, truncation=True, max_length=32, return_tensors="pt")

    def pooled(model):
        with torch.no_grad():
            hidden = model.eval()(**batch).last_hidden_state
        mask = batch["attention_mask"].unsqueeze(-1).float()
        return F.normalize((hidden * mask).sum(1) / mask.sum(1), dim=-1)

    base = pooled(AutoModel.from_pretrained(tiny_bert))
    adapted = pooled(PeftModel.from_pretrained(AutoModel.from_pretrained(tiny_bert),
                                               str(tiny_run / "tasks" / "01-a" / "adapter")))
    assert saved["drift"]["cka"][0][-1] == pytest.approx(measures.linear_cka(base, adapted),
                                                         abs=1e-5)


@pytest.mark.slow
def test_upper_layers_only_leave_the_lower_layer_at_cka_1(tiny_run_config, tmp_path):
    """`lora.layers: last 1` (as the demo preset adapts its top layers): only layer 1 has
    updates, and the representation of the untouched layer 0 is the base's, CKA 1."""
    path = tmp_path / "upper.yaml"
    path.write_text(yaml.safe_dump(tiny_run_config(
        "naive", lora={"r": 2, "layers": "last 1"},
        upstream={"kind": "wordnet_retrieval", "size": 10})))
    assert main(["run", str(path)]) == 0
    outcome = diagnose([tmp_path / "runs" / "tiny-naive"], DiagnoseOptions())
    assert outcome.diagnosis["layers"] == ["1"]
    cka = outcome.diagnosis["drift"]["cka"]
    assert [row[0] for row in cka] == pytest.approx([1.0, 1.0], abs=1e-9)
    assert all(row[1] < 1.0 - 1e-6 for row in cka)


def test_no_drift_skips_the_forward_passes(tiny_run, tmp_path):
    out = tmp_path / "diag"
    assert main(["diagnose", str(tiny_run), "--no-drift", "--out", str(out)]) == 0
    saved = json.loads((out / "diagnosis.json").read_text())
    assert saved["drift"] == {"skipped": "--no-drift"}
    assert not (out / "figures" / "diagnosis_drift.png").exists()
    assert not (tiny_run / "diagnosis.json").exists()  # --out: the run folder is untouched


@pytest.mark.slow
def test_diagnose_a_bench(tiny_bench_config, tmp_path, capsys):
    """naive, replay and joint: every run diagnosed, the bench table, the report's section."""
    assert main(["bench", str(tiny_bench_config("diagbench"))]) == 0
    bench = tmp_path / "runs" / "diagbench"
    capsys.readouterr()
    assert main(["diagnose", str(bench), "--no-drift"]) == 0
    printed = capsys.readouterr().out
    saved = json.loads((bench / "diagnosis.json").read_text())
    assert [r["strategy"] for r in saved["runs"]] == ["naive", "replay", "joint"]
    assert saved["runs"][2]["definition"] == "retrained_difference"
    assert saved["correlations"]["n"] == 2  # joint is left out of the comparison
    assert "too few to compare" in " ".join(saved["verdict"]) and "too few" in printed
    for run in ("naive-r2", "replay-r2", "joint-r2"):
        assert (bench / "runs" / run / "diagnosis.json").is_file()
    page = (bench / "report.html").read_text()
    assert "Diagnosis: do the strategies that forget less interfere less?" in page
    assert page.count("Diagnosis: why did it forget?") == 3


@pytest.mark.slow
def test_ortho_init_starts_orthogonal_and_merge_reinit_does_not(tiny_run_config, tmp_path):
    """What ortho_init is for, seen by diagnose: its task 2 adapter's A starts orthogonal to
    task 1's and stays nearly so after a few steps; merge_reinit's fresh A is random, at about
    the chance level, and naive keeps training one A, so its tasks share most of it."""
    overlaps = {}
    for strategy in ("ortho_init", "merge_reinit", "naive"):
        path = tmp_path / f"{strategy}.yaml"
        path.write_text(yaml.safe_dump(tiny_run_config(strategy)))
        assert main(["run", str(path)]) == 0
        outcome = diagnose([tmp_path / "runs" / f"tiny-{strategy}"], DiagnoseOptions(drift=False))
        (pair,) = outcome.diagnosis["pairs"]
        overlaps[strategy] = (pair["overlap_input"], pair["chance_overlap_input"])
    assert overlaps["ortho_init"][0] < 0.2 * overlaps["ortho_init"][1]
    assert overlaps["ortho_init"][0] < overlaps["merge_reinit"][0] < overlaps["naive"][0]
    assert overlaps["naive"][0] > 0.5
