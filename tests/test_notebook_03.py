"""Notebook 03 (value landscape) runs headless under papermill with quick parameters and writes its PNGs."""
from __future__ import annotations

import os

os.environ.setdefault("MPLBACKEND", "Agg")

from pathlib import Path

import nbformat
import papermill
import pytest
import torch

from esper_lib.checkpoint import save_checkpoint
from esper_lib.notebooks.runner import QUICK_PARAMETERS, run_notebook
from landscape_support import small_policy

REPO_ROOT = Path(__file__).resolve().parent.parent
NOTEBOOK = REPO_ROOT / "notebooks" / "03_value_landscape.ipynb"
QUICK = QUICK_PARAMETERS["03_value_landscape"]
PNGS = ("q_trajectory.png", "q_heatmap.png", "op_probs.png", "feature_sweep.png", "overview.png")


def _execute(tmp_path: Path, **parameters) -> nbformat.NotebookNode:
    executed = run_notebook("03_value_landscape", parameters=parameters, quick=True, out_root=tmp_path)
    return nbformat.read(executed, as_version=4)


def _text(nb: nbformat.NotebookNode) -> str:
    return "\n".join(
        o.get("text", "") if o.output_type == "stream" else "" for c in nb.cells if c.cell_type == "code" for o in c.outputs
    )


def test_committed_clean_with_typed_parameters() -> None:
    nb = nbformat.read(NOTEBOOK, as_version=4)
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert "parameters" in code[0].metadata.get("tags", [])
    assert not any(c.outputs or c.execution_count for c in code)
    assert nb.metadata["kernelspec"] == {"display_name": "Python (esper-lib)", "language": "python", "name": "esper-lib"}
    declared = papermill.inspect_notebook(str(NOTEBOOK))
    assert set(QUICK) | {"checkpoint_path", "controller", "seed", "sweep_feature", "sweep_low", "sweep_high", "out_dir"} <= set(declared)
    assert all(p["inferred_type_name"] != "None" and p["help"] for p in declared.values())
    assert declared["checkpoint_path"]["default"] == '"artefacts/01_build_v2_model/tamiyo_v2.pt"'


@pytest.mark.notebook
def test_notebook_03_runs_quick_and_writes_pngs(tmp_path: Path) -> None:
    from esper_lib.ppo.normalization import RunningObsNormalizer

    norm = RunningObsNormalizer(121)
    norm.update(torch.randn(64, 121))
    # A checkpoint as PPOTrainer.save writes it: normaliser plus the PPO state with the update count.
    ckpt = save_checkpoint(tmp_path / "model.pt", small_policy(4), obs_normalizer_state=norm.state_dict(), extra={"ppo": {"update_index": 3}})
    nb = _execute(tmp_path, checkpoint_path=str(ckpt))
    out = tmp_path / "03_value_landscape"
    for name in PNGS:
        assert (out / name).stat().st_size > 1000, f"notebook 03 did not write {name}"
    for name in ("q_trajectory", "q_heatmap", "op_probs", "feature_sweep"):
        assert (out / f"explorer_{name}.png").is_file()
    assert (out / "landscape.csv").is_file() and (out / "trajectory.npz").is_file()
    text = _text(nb)
    assert f"loaded {ckpt}" in text and "observation normaliser applied" in text
    assert "explorer redrew" in text
    assert f"TRAINED checkpoint .../{ckpt.parent.name}/{ckpt.name} (3 PPO updates)" in text
    from test_notebooks import figure_cells_without_an_image

    assert not figure_cells_without_an_image(nb), "figure cells without an image in the executed copy"
    # the recording progress bar leaves a final, full text line (not a widget stuck at 0%)
    bars = [line for line in text.replace("\r", "\n").splitlines() if line.startswith("recording")]
    assert bars and "100%" in bars[-1], bars[-1:]
    done = bars[-1].split("|")[2].split()[0]  # " 5/5 [..." -> "5/5"
    n, total = done.split("/")
    assert n == total == str(QUICK["max_epochs"]), bars[-1]
    assert not any("application/vnd.jupyter.widget-view+json" in o.get("data", {}) for c in nb.cells[:8] for o in c.get("outputs", []))


@pytest.mark.notebook
def test_notebook_03_rejects_a_bad_parameter(tmp_path: Path) -> None:
    with pytest.raises(papermill.PapermillExecutionError, match="parameter controller must be one of"):
        _execute(tmp_path, controller="nope")
