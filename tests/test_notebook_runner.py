"""The runner's command line: -p and -f parameters, unknown names and wrong types fail before anything runs."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from esper_lib.notebooks import runner as nr


def _runs(*names: str) -> list[nr.Run]:
    return [nr.plan_run(n) for n in names]


def test_plan_runs_notebook_03_again_on_the_trained_checkpoint() -> None:
    names = [r.name for r in nr.PLAN]
    trained = nr.plan_run("03_value_landscape_trained")
    assert names.index("03_value_landscape_trained") > names.index("04_short_training")
    assert trained.notebook == "03_value_landscape" and trained.require_links
    assert trained.links == {"checkpoint_path": nr.TRAINED_CHECKPOINT}
    assert nr.TRAINED_CHECKPOINT == "04_short_training/tamiyo_v2_ppo.pt"


def test_trained_run_without_the_checkpoint_fails_clearly(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="tamiyo_v2_ppo.pt, which does not exist"):
        nr.run_notebook("03_value_landscape_trained", quick=True, out_root=tmp_path)


def test_cli_parameters_are_parsed_by_declared_type() -> None:
    params = nr.resolve_run_parameters(
        _runs("04_short_training"),
        cli_parameters=[("updates", "100"), ("train_seeds", "[3, 4]"), ("lr", "1e-3"), ("op_advantage", "q"), ("vector_env", "sync"),
                        ("show_progress", "false"), ("ent_coef", "0")],
    )["04_short_training"]
    assert params == {"updates": 100, "train_seeds": [3, 4], "lr": 1e-3, "op_advantage": "q", "vector_env": "sync",
                      "show_progress": False, "ent_coef": 0.0}
    assert isinstance(params["ent_coef"], float)  # an int given for a float parameter becomes a float
    lists = nr.resolve_run_parameters(_runs("02_validate_shapes"), cli_parameters=[("batch_sizes", "[1, 4]")])
    assert lists["02_validate_shapes"] == {"batch_sizes": [1, 4]}


def test_an_optional_bool_takes_true_false_or_none() -> None:
    for raw, value in (("true", True), ("false", False), ("None", None), ("null", None)):  # notebook 04: Optional[bool]
        params = nr.resolve_run_parameters(_runs("04_short_training"), cli_parameters=[("native_kernels", raw)])
        assert params["04_short_training"] == {"native_kernels": value}
    with pytest.raises(ValueError, match=r"parameter 'native_kernels' .* must be bool or None .*got 'maybe'"):
        nr.resolve_run_parameters(_runs("04_short_training"), cli_parameters=[("native_kernels", "maybe")])


def test_flat_parameters_go_to_every_selected_notebook_that_declares_them() -> None:
    params = nr.resolve_run_parameters(_runs("01_build_v2_model", "04_short_training"), cli_parameters=[("seed", "3"), ("updates", "5")])
    # notebook 04 declares train_seeds, not seed: the flat seed goes to 01 only
    assert params == {"01_build_v2_model": {"seed": 3}, "04_short_training": {"updates": 5}}


def test_unknown_name_is_rejected() -> None:
    with pytest.raises(ValueError, match=r"unknown papermill parameter\(s\) \['updatez'\] for notebook '04_short_training'"):
        nr.resolve_run_parameters(_runs("04_short_training"), cli_parameters=[("updatez", "3")])
    with pytest.raises(ValueError, match=r"\['hiden_dim'\]: none of the selected notebooks"):
        nr.resolve_run_parameters(_runs("01_build_v2_model", "02_validate_shapes"), file_parameters={"hiden_dim": 64})


@pytest.mark.parametrize(
    ("name", "raw", "message"),
    [
        ("updates", "1.5", r"parameter 'updates' of notebook '04_short_training' must be int .*got 1.5 \(float\)"),
        ("updates", "many", r"parameter 'updates' .* must be int .*got 'many' \(str\)"),
        ("show_progress", "1", r"parameter 'show_progress' .* must be bool"),
        ("lr", "fast", r"parameter 'lr' .* must be float"),
    ],
)
def test_wrong_type_is_rejected_naming_the_parameter(name: str, raw: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        nr.resolve_run_parameters(_runs("04_short_training"), cli_parameters=[(name, raw)])


def test_parameter_file_flat_and_by_notebook_and_run(tmp_path: Path) -> None:
    path = tmp_path / "params.yaml"
    path.write_text(
        "seed: 7\n"
        "03_value_landscape:\n  max_epochs: 4\n  sweep_feature: val_accuracy\n"
        "03_value_landscape_trained:\n  controller: policy_greedy\n"
        "04_short_training:\n  updates: 100\n"
    )
    params = nr.resolve_run_parameters(
        _runs("03_value_landscape", "04_short_training", "03_value_landscape_trained"),
        file_parameters=nr.load_parameter_file(path),
        cli_parameters=[("updates", "3")],  # -p wins over the file
    )
    assert params["03_value_landscape"] == {"seed": 7, "max_epochs": 4, "sweep_feature": "val_accuracy"}
    assert params["03_value_landscape_trained"] == {"seed": 7, "max_epochs": 4, "sweep_feature": "val_accuracy", "controller": "policy_greedy"}
    assert params["04_short_training"] == {"updates": 3}  # 04 declares train_seeds, not seed
    as_json = tmp_path / "params.json"
    as_json.write_text(json.dumps({"updates": 2.5}))
    with pytest.raises(ValueError, match="parameter 'updates' .* must be int"):
        nr.resolve_run_parameters(_runs("04_short_training"), file_parameters=nr.load_parameter_file(as_json))
    bad = tmp_path / "list.yaml"
    bad.write_text("- 1\n- 2\n")
    with pytest.raises(ValueError, match="must hold a mapping"):
        nr.load_parameter_file(bad)


def test_main_reports_errors_as_usage_errors(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        nr.main(["--only", "04_short_training", "-p", "updates", "ten"])
    assert exit_info.value.code == 2
    assert "parameter 'updates' of notebook '04_short_training' must be int" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        nr.main(["--only", "05_missing"])
    assert "unknown run(s) ['05_missing']" in capsys.readouterr().err
    assert nr.main(["--list"]) == 0
    assert "03_value_landscape_trained" in capsys.readouterr().out
