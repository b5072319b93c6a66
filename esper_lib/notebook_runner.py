"""Execute the workbook's notebooks headless with papermill, in order, into ``artefacts/<notebook>/``.

``python -m esper_lib.notebook_runner [--quick] [--only NAME ...]`` is the main job (``make run``).
Parameters are checked against each notebook's ``parameters`` cell before running: papermill
only warns about unknown names, we raise.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parent.parent
NOTEBOOK_DIR = REPO_ROOT / "notebooks"
DEFAULT_OUT_ROOT = REPO_ROOT / "artefacts"
KERNEL_NAME = "esper-lib"

# Notebooks in execution order (later ones read what earlier ones saved).
NOTEBOOKS: tuple[str, ...] = (
    "01_build_v2_model",
    "02_validate_shapes",
    "03_value_landscape",
    "04_short_training",
)

# Parameters that make each notebook run in seconds (tests and ``--quick``).
QUICK_PARAMETERS: dict[str, dict[str, Any]] = {
    "01_build_v2_model": {},
    "02_validate_shapes": {"batch_sizes": [1, 3], "seq_lens": [1, 4], "num_draws": 500},
    "03_value_landscape": {"max_epochs": 5, "batches_per_epoch": 2, "sweep_points": 7},
    "04_short_training": {
        "num_envs": 2, "max_epochs": 6, "batches_per_epoch": 2, "updates": 2, "num_steps": 6, "seq_len": 3,
        "epochs": 2, "feature_dim": 64, "hidden_dim": 64, "eval_episodes": 2, "show_progress": False,
    },
}

# Inputs a notebook reads from an earlier notebook's output folder (relative to the same out_root);
# passed only when not given explicitly and the file exists (else the notebook's own default applies).
LINKED_PARAMETERS: dict[str, dict[str, str]] = {
    "02_validate_shapes": {"checkpoint_path": "01_build_v2_model/tamiyo_v2.pt"},
    "03_value_landscape": {"checkpoint_path": "01_build_v2_model/tamiyo_v2.pt"},
}


def notebook_path(name: str) -> Path:
    """Path of the notebook called ``name`` (stem, e.g. ``"01_build_v2_model"``)."""
    path = NOTEBOOK_DIR / f"{name}.ipynb"
    if not path.is_file():
        raise FileNotFoundError(f"no notebook {name!r} in {NOTEBOOK_DIR} (known: {', '.join(available_notebooks())})")
    return path


def available_notebooks() -> list[str]:
    """The ordered notebooks that exist on disk."""
    return [n for n in NOTEBOOKS if (NOTEBOOK_DIR / f"{n}.ipynb").is_file()]


def notebook_parameters(name: str) -> dict[str, dict[str, Any]]:
    """The notebook's declared parameters (papermill's inspection: name -> type, default, help)."""
    import papermill

    return papermill.inspect_notebook(str(notebook_path(name)))


def check_parameters(name: str, parameters: dict[str, Any]) -> None:
    """Raise ValueError if ``parameters`` names something the notebook does not declare."""
    declared = notebook_parameters(name)
    unknown = sorted(set(parameters) - set(declared))
    if unknown:
        raise ValueError(
            f"unknown papermill parameter(s) {unknown} for notebook {name!r}; it declares {sorted(declared)}"
        )


def run_notebook(
    name: str,
    parameters: dict[str, Any] | None = None,
    quick: bool = False,
    out_root: str | os.PathLike = DEFAULT_OUT_ROOT,
    kernel_name: str | None = None,
    progress: bool = False,
) -> Path:
    """Execute one notebook; returns the executed copy's path ``<out_root>/<name>/<name>.ipynb``.

    ``out_dir`` (when the notebook declares it) is set to ``<out_root>/<name>`` unless given.
    ``quick`` starts from ``QUICK_PARAMETERS[name]``; explicit ``parameters`` override it.
    ``LINKED_PARAMETERS`` point a notebook at what an earlier one saved under the same ``out_root``.
    """
    import papermill

    params: dict[str, Any] = dict(QUICK_PARAMETERS.get(name, {})) if quick else {}
    params.update(parameters or {})
    out_dir = Path(out_root) / name
    declared = notebook_parameters(name)
    if "out_dir" in declared:
        params.setdefault("out_dir", str(out_dir))
    for key, relative in LINKED_PARAMETERS.get(name, {}).items():
        linked = Path(out_root) / relative
        if key not in params and linked.is_file():
            params[key] = str(linked)
    check_parameters(name, params)
    out_dir.mkdir(parents=True, exist_ok=True)
    output = out_dir / f"{name}.ipynb"
    papermill.execute_notebook(
        str(notebook_path(name)),
        str(output),
        parameters=params,
        kernel_name=kernel_name or default_kernel(),
        cwd=str(REPO_ROOT),
        progress_bar=progress,
    )
    return output


def default_kernel() -> str:
    """The project's registered kernel if installed in this environment, else ``python3``."""
    from jupyter_client.kernelspec import KernelSpecManager

    return KERNEL_NAME if KERNEL_NAME in KernelSpecManager().find_kernel_specs() else "python3"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="use each notebook's quick parameters")
    parser.add_argument("--only", nargs="*", default=None, help="notebook stems to run (default: all, in order)")
    parser.add_argument("--out-root", default=str(DEFAULT_OUT_ROOT), help="where executed notebooks and figures go")
    args = parser.parse_args(argv)
    names = args.only or available_notebooks()
    for name in names:
        start = time.perf_counter()
        print(f"[run] {name} ...", flush=True)
        output = run_notebook(name, quick=args.quick, out_root=args.out_root, progress=True)
        print(f"[run] {name} done in {time.perf_counter() - start:.1f} s -> {output.parent}", flush=True)
    print(f"Executed notebooks, figures and tables are under {Path(args.out_root).resolve()}/<notebook>/")
    return 0


if __name__ == "__main__":
    sys.exit(main())
