"""Every notebook runs headless under papermill with its quick parameters and writes its artefacts."""
from __future__ import annotations

from pathlib import Path

import nbformat
import pytest

from esper_lib.constants import HEAD_NAMES
from esper_lib.notebooks.runner import NOTEBOOKS, QUICK_PARAMETERS, check_parameters, notebook_parameters, run_notebook

# Files each notebook must leave in its output folder (besides the executed copy).
EXPECTED_ARTEFACTS: dict[str, tuple[str, ...]] = {
    "01_build_v2_model": ("tamiyo_v2.pt", "parameters_per_module.png", "parameters_per_module.csv", "init_gains.csv"),
    "02_validate_shapes": ("shape_table.csv", "masked_sampling.csv", "value_consistency.csv", "recurrence.png"),
    "04_short_training": (
        "tamiyo_v2_ppo.pt",
        "seed_0/tamiyo_v2_ppo.pt",
        "seed_1/metrics.csv",
        "seed_0/calibration.csv",
        "metrics.csv",
        "evaluation_episodes.csv",
        "evaluation_summary.csv",
        "calibration_summary.csv",
        "op_sequences.csv",
        "greedy_op_probabilities.csv",
        "greedy_op_probabilities.png",
        "first_epoch_choices.png",
        "seed_0/first_epoch.csv",
        "iteration_timing.csv",
        "run_summary.json",
        "controller_comparison.png",
        "learning_curve_and_calibration.png",
        "diagnostics.png",
        "entropy_and_ops.png",
    ),
}


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_quick_parameters_are_declared(name: str) -> None:
    declared = notebook_parameters(name)
    assert "out_dir" in declared
    unknown = set(QUICK_PARAMETERS[name]) - set(declared)
    assert not unknown, f"{name}: quick parameters {unknown} are not in the parameters cell"


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_committed_without_outputs_and_with_a_parameters_cell(name: str) -> None:
    nb = nbformat.read(Path("notebooks") / f"{name}.ipynb", as_version=4)
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert not any(c.get("outputs") or c.get("execution_count") for c in code), f"{name} carries outputs"
    tagged = [c for c in code if "parameters" in c.metadata.get("tags", [])]
    assert len(tagged) == 1 and tagged[0] is code[0], f"{name}: the first code cell must be the only parameters cell"
    assert nb.metadata["kernelspec"]["name"] == "esper-lib"


def test_unknown_parameter_is_rejected() -> None:
    with pytest.raises(ValueError, match=r"unknown papermill parameter\(s\) \['hiden_dim'\]"):
        check_parameters("01_build_v2_model", {"hiden_dim": 64})
    with pytest.raises(FileNotFoundError, match="no notebook"):
        check_parameters("99_missing", {})


def figure_cells_without_an_image(nb: nbformat.NotebookNode) -> list[str]:
    """Sources (first line) of code cells tagged ``figure`` that have no image/png output."""
    return [
        c.source.splitlines()[0]
        for c in nb.cells
        if c.cell_type == "code" and "figure" in c.metadata.get("tags", []) and not any("image/png" in o.get("data", {}) for o in c.outputs)
    ]


@pytest.mark.parametrize("name", ("01_build_v2_model", "02_validate_shapes", "03_value_landscape", "04_short_training"))
def test_figure_cells_are_tagged_and_use_show_and_save(name: str) -> None:
    nb = nbformat.read(Path("notebooks") / f"{name}.ipynb", as_version=4)
    figure_cells = [c for c in nb.cells if "figure" in c.metadata.get("tags", [])]
    assert figure_cells, f"{name}: no cell tagged 'figure'"
    assert all("show_and_save(" in c.source for c in figure_cells)
    assert not any("plt.show()" in c.source for c in nb.cells if c.cell_type == "code"), f"{name}: plt.show() draws nothing headless"


@pytest.mark.notebook
def test_notebooks_01_02_run_quick(tmp_path: Path) -> None:
    for name in ("01_build_v2_model", "02_validate_shapes"):
        executed = run_notebook(name, quick=True, out_root=tmp_path)
        assert executed.is_file()
        for artefact in EXPECTED_ARTEFACTS[name]:
            assert (tmp_path / name / artefact).is_file(), f"{name} did not write {artefact}"
        nb = nbformat.read(executed, as_version=4)
        assert not figure_cells_without_an_image(nb), f"{name}: figure cells without an image in the executed copy"
    # 02 can validate the model notebook 01 saved.
    run_notebook(
        "02_validate_shapes",
        parameters={"checkpoint_path": str(tmp_path / "01_build_v2_model" / "tamiyo_v2.pt")},
        quick=True,
        out_root=tmp_path / "from_ckpt",
    )
    assert (tmp_path / "from_ckpt" / "02_validate_shapes" / "shape_table.csv").is_file()


@pytest.mark.notebook
def test_relative_paths_resolve_against_the_repository_root_from_notebooks_folder() -> None:
    """Opened from notebooks/ (JupyterLab's working directory), a relative out_dir still means <repo>/artefacts/..."""
    import shutil
    import uuid

    from esper_lib.notebooks.runner import REPO_ROOT

    relative = f"artefacts/_test_cwd_{uuid.uuid4().hex[:8]}"
    try:
        run_notebook("01_build_v2_model", parameters={"out_dir": relative, "feature_dim": 16, "hidden_dim": 16}, out_root=REPO_ROOT / relative / "runner", cwd=REPO_ROOT / "notebooks")
        assert (REPO_ROOT / relative / "tamiyo_v2.pt").is_file()
        assert not (REPO_ROOT / "notebooks" / "artefacts").exists(), "the notebook wrote under notebooks/artefacts/"
    finally:
        shutil.rmtree(REPO_ROOT / relative, ignore_errors=True)
        shutil.rmtree(REPO_ROOT / "notebooks" / "artefacts", ignore_errors=True)


@pytest.mark.notebook
def test_notebook_failure_surfaces(tmp_path: Path) -> None:
    import papermill

    with pytest.raises(papermill.PapermillExecutionError, match="batch_sizes must be a non-empty list"):
        run_notebook("02_validate_shapes", parameters={"batch_sizes": [0]}, quick=True, out_root=tmp_path)


@pytest.mark.notebook
@pytest.mark.parametrize("name, value", [("argument_entropy_coef", -1.0), ("gae_lambda", 1.5)])
def test_notebook_04_names_a_bad_learning_parameter(tmp_path: Path, name: str, value: float) -> None:
    import papermill

    with pytest.raises(papermill.PapermillExecutionError, match=f"parameter {name} must be a number in"):
        run_notebook("04_short_training", parameters={name: value}, quick=True, out_root=tmp_path)


@pytest.mark.notebook
def test_notebook_04_names_a_native_kernels_value_that_is_not_a_bool(tmp_path: Path) -> None:
    """The runner refuses it before any cell runs; papermill called directly meets the notebook's own check."""
    import papermill

    from esper_lib.notebooks.runner import REPO_ROOT, default_kernel, notebook_path

    with pytest.raises(ValueError, match=r"parameter 'native_kernels' of notebook '04_short_training' must be bool or None"):
        run_notebook("04_short_training", parameters={"native_kernels": "yes"}, quick=True, out_root=tmp_path)
    with pytest.raises(papermill.PapermillExecutionError, match="parameter native_kernels must be True, False or None"):
        papermill.execute_notebook(
            str(notebook_path("04_short_training")), str(tmp_path / "out.ipynb"), parameters={"native_kernels": "yes"},
            kernel_name=default_kernel(), cwd=str(REPO_ROOT), progress_bar=False,
        )


@pytest.mark.notebook
def test_notebook_04_refuses_kernels_it_was_asked_for_that_cannot_be_built(tmp_path: Path, monkeypatch) -> None:
    """No C compiler (CC=false, an empty cache): native_kernels=True stops with the reason instead of training on
    the other path."""
    import papermill

    monkeypatch.setenv("CC", "false")
    monkeypatch.setenv("ESPER_NATIVE_CACHE", str(tmp_path / "empty_cache"))  # the notebook's kernel inherits both
    with pytest.raises(papermill.PapermillExecutionError, match="native_kernels is True, but the C kernels could not be built"):
        run_notebook("04_short_training", parameters={"native_kernels": True, "train_seeds": [0]}, quick=True, out_root=tmp_path)


@pytest.mark.notebook
def test_notebook_04_trains_with_the_gae_lambda_it_is_given(tmp_path: Path) -> None:
    from esper_lib.ppo import load_trained

    run_notebook("04_short_training", parameters={"gae_lambda": 1.0, "train_seeds": [0]}, quick=True, out_root=tmp_path)
    _, _, config = load_trained(tmp_path / "04_short_training" / "tamiyo_v2_ppo.pt")
    assert config.gae_lambda == 1.0  # the default is 0.95


@pytest.mark.notebook
@pytest.mark.parametrize("kernels", [True, False])
def test_notebook_04_trains_on_the_path_it_is_asked_for(tmp_path: Path, kernels: bool) -> None:
    """True: the C kernels (the default where they build); False: the torch path of the runs documented before."""
    import json

    from esper_lib.envs import native

    if kernels and not native.available():
        pytest.skip("no C compiler here: the native kernels cannot be built")
    before = native.switched_on()
    run_notebook("04_short_training", parameters={"native_kernels": kernels, "train_seeds": [0]}, quick=True, out_root=tmp_path)
    summary = json.loads((tmp_path / "04_short_training" / "run_summary.json").read_text())
    assert summary["native_kernels"] is kernels  # recorded with the run: which kernels produced it
    assert native.switched_on() == before  # the notebook's kernel process switched, not this one


@pytest.mark.notebook
def test_notebook_04_trains_evaluates_and_saves(tmp_path: Path) -> None:
    import json

    import pandas as pd

    from esper_lib.ppo import load_trained

    run_notebook("04_short_training", quick=True, out_root=tmp_path)
    out = tmp_path / "04_short_training"
    for artefact in EXPECTED_ARTEFACTS["04_short_training"]:
        assert (out / artefact).is_file(), f"04 did not write {artefact}"
    q = QUICK_PARAMETERS["04_short_training"]
    metrics = pd.read_csv(out / "metrics.csv")
    assert len(metrics) == q["updates"] * len(q["train_seeds"]) and sorted(metrics.train_seed.unique()) == q["train_seeds"]
    summary = pd.read_csv(out / "evaluation_summary.csv")
    assert set(summary["controller"]) == {"ppo", "ppo_sampled", "heuristic", "random_masked", "always_wait", "best_schedule"}
    assert set(summary["metric"]) == {"return", "final_val_accuracy"}
    # per training seed and aggregated; every episode of the aggregate is counted
    ppo = summary[(summary.controller == "ppo") & (summary.metric == "return")]
    assert sorted(ppo.train_seed.astype(str)) == sorted([*map(str, q["train_seeds"]), "all"])
    assert (ppo[ppo.train_seed.astype(str) == "all"].n == q["heldout_episodes"] * len(q["train_seeds"])).all()
    sampled = summary[(summary.controller == "ppo_sampled") & (summary.metric == "return")]  # the stochastic readout, same layout
    assert sorted(sampled.train_seed.astype(str)) == sorted(ppo.train_seed.astype(str))
    episodes = pd.read_csv(out / "evaluation_episodes.csv")
    assert (episodes.groupby(["controller", "train_seed"], dropna=False).seed.nunique() == q["heldout_episodes"]).all()
    run = json.loads((out / "run_summary.json").read_text())
    assert 0 < run["peak_rss_gib"] <= run["peak_total_gib_upper_bound"] < 3.0, "a quick run of notebook 04 must stay under 3 GiB"
    assert run["vector_env"] == "sync" and run["workers"] == 3 and run["eval_workers"] == 2  # the defaults
    from esper_lib.envs import native

    assert run["native_kernels"] is (native.switched_on() and native.available())  # on unless ESPER_NATIVE=0 here (or no compiler)
    assert run["seed_group_size"] == 2
    training = pd.read_csv(out / "seed_0" / "training_episodes.csv")
    assert len(training) > 0 and {"reward_accuracy_delta", "reward_rent", "reward_terminal"} <= set(training.columns)
    policy, normalizer, config = load_trained(out / "tamiyo_v2_ppo.pt")
    assert policy.hidden_dim == q["hidden_dim"] and normalizer is not None
    assert config.num_envs == q["num_envs"] and config.seed == 0
    # the defaults that hold the op head open while the argument heads learn (docs/ppo_morpho.md)
    assert config.head_loss_denominator == "relevant_steps" and config.entropy_floor_updates == run["op_entropy_floor_updates"]
    assert config.head_entropy_floors["op"] == run["op_entropy_floor"] > 0
    coefs = config.head_entropy_coefs  # the argument heads may commit (argument_entropy_coef, default 0)
    assert coefs["op"] == 1.0 and {h: c for h, c in coefs.items() if h != "op"} == dict.fromkeys(HEAD_NAMES[1:], run["argument_entropy_coef"])
    assert run["argument_entropy_coef"] == 0.0
    assert config.gae_lambda == run["gae_lambda"]
    nb = nbformat.read(out / "04_short_training.ipynb", as_version=4)
    assert not figure_cells_without_an_image(nb)
    text = "".join(o.get("data", {}).get("text/markdown", "") for c in nb.cells if c.cell_type == "code" for o in c.outputs)
    assert "beats" in text or "loses to" in text or "is not distinguishable from" in text


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_every_line_of_the_parameters_cell_is_a_parameter_papermill_can_read(name: str) -> None:
    """papermill skips (with only a log warning) an assignment it cannot parse, e.g. a comment holding a colon and quotes."""
    import re

    nb = nbformat.read(Path("notebooks") / f"{name}.ipynb", as_version=4)
    cell = next(c for c in nb.cells if c.cell_type == "code" and "parameters" in c.metadata.get("tags", []))
    assigned = {m.group(1) for line in cell.source.splitlines() if (m := re.match(r"^([A-Za-z_]\w*)\s*(?::[^=]+)?=", line))}
    assert set(notebook_parameters(name)) == assigned
