"""Execute the workbook's notebooks headless with papermill, in order, into ``artefacts/<run>/``.

``python -m esper_lib.notebooks.runner`` is the main job (``make run``). It follows ``PLAN``: notebooks
01 to 04, then notebook 03 a second time on the checkpoint notebook 04 trained
(``03_value_landscape_trained``), so the landscape of the untrained and of the trained critic can
be read side by side.

Command line::

    python -m esper_lib.notebooks.runner [--quick] [--only RUN ...] [--out-root DIR]
                                         [-p NAME VALUE ...] [-f params.yaml] [--list]

- ``--only`` picks runs of the plan by name (``--list`` prints them).
- ``-p NAME VALUE`` sets a parameter; the value is read as a Python or YAML literal
  (``-p updates 100``, ``-p lr 1e-3``, ``-p batch_sizes "[1, 4]"``, ``-p async_envs false``), except
  for parameters declared ``str``, which take the text as it is.
- ``-f FILE`` reads parameters from a YAML or JSON mapping: top-level ``name: value`` pairs, and/or
  sections keyed by a notebook name (every run of that notebook) or by a run name (that run only).
  Precedence, lowest first: quick parameters, flat file values, notebook sections, run sections, ``-p``.
- A flat parameter (file or ``-p``) goes to every selected run whose notebook declares it; a name no
  selected notebook declares is an error, and so is a value whose type does not match the parameters
  cell's annotation (``int``, ``float``, ``str``, ``bool``, ``list``, ``dict``, ``Optional[...]``).
  All of this is checked before the first notebook starts: papermill itself only warns.

Kernels started by the runner get ``ESPER_HEADLESS=1`` (text progress bars, see
``esper_lib.notebooks.helpers``) and matplotlib's inline backend, so figures appear in the executed
notebooks as well as in the PNG files the notebooks save.
"""
from __future__ import annotations

import argparse
import ast
import contextlib
import os
import sys
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parents[2]  # esper_lib/notebooks/runner.py -> repository
NOTEBOOK_DIR = REPO_ROOT / "notebooks"
DEFAULT_OUT_ROOT = REPO_ROOT / "artefacts"
KERNEL_NAME = "esper-lib"
INLINE_BACKEND = "module://matplotlib_inline.backend_inline"

# Notebooks in execution order (later ones read what earlier ones saved).
NOTEBOOKS: tuple[str, ...] = (
    "01_build_v2_model",
    "02_validate_shapes",
    "03_value_landscape",
    "04_short_training",
)

# What notebooks save for later ones, relative to the run's out_root (notebook 04 writes its
# checkpoint into its out_dir, which the runner sets to <out_root>/04_short_training).
MODEL_CHECKPOINT = "01_build_v2_model/tamiyo_v2.pt"
TRAINED_CHECKPOINT = "04_short_training/tamiyo_v2_ppo.pt"

# Parameters that make each notebook run in seconds (tests and ``--quick``), by notebook.
QUICK_PARAMETERS: dict[str, dict[str, Any]] = {
    "01_build_v2_model": {},
    "02_validate_shapes": {"batch_sizes": [1, 3], "seq_lens": [1, 4], "num_draws": 500},
    "03_value_landscape": {"max_epochs": 5, "batches_per_epoch": 2, "sweep_points": 7},
    "04_short_training": {
        "train_seeds": [0, 1], "num_envs": 2, "max_epochs": 4, "batches_per_epoch": 2, "updates": 2, "num_steps": 8,
        "seq_len": 4, "epochs": 1, "feature_dim": 32, "hidden_dim": 32, "heldout_episodes": 3, "show_progress": False,
        "seed_group_size": 2,
    },
}


@dataclass(frozen=True)
class Run:
    """One execution of a notebook in the plan.

    name: the run's name (``--only``, output folder ``<out_root>/<name>/``).
    notebook: the notebook's stem in ``notebooks/``.
    links: parameter -> file under out_root that an earlier run writes; passed when not given explicitly.
    require_links: a missing linked file is an error (else the notebook's own default applies).
    description: one line for ``--list`` and the README.
    """

    name: str
    notebook: str
    links: Mapping[str, str] = field(default_factory=dict)
    require_links: bool = False
    description: str = ""


PLAN: tuple[Run, ...] = (
    Run("01_build_v2_model", "01_build_v2_model", description="build the V2 network, parameters, init gains, checkpoint"),
    Run("02_validate_shapes", "02_validate_shapes", {"checkpoint_path": MODEL_CHECKPOINT}, description="shape and consistency checks"),
    Run("03_value_landscape", "03_value_landscape", {"checkpoint_path": MODEL_CHECKPOINT}, description="Q(s, op) landscape of notebook 01's untrained network"),
    Run("04_short_training", "04_short_training", description="short recurrent PPO run on the morphogenetic env"),
    Run(
        "03_value_landscape_trained",
        "03_value_landscape",
        {"checkpoint_path": TRAINED_CHECKPOINT},
        require_links=True,
        description="Q(s, op) landscape of the critic notebook 04 trained",
    ),
)

# Kept for callers of the earlier API: the links of each notebook's first run.
LINKED_PARAMETERS: dict[str, dict[str, str]] = {r.notebook: dict(r.links) for r in reversed(PLAN) if r.links and r.name == r.notebook}


def notebook_path(name: str) -> Path:
    """Path of the notebook called ``name`` (stem, e.g. ``"01_build_v2_model"``)."""
    path = NOTEBOOK_DIR / f"{name}.ipynb"
    if not path.is_file():
        raise FileNotFoundError(f"no notebook {name!r} in {NOTEBOOK_DIR} (known: {', '.join(available_notebooks())})")
    return path


def available_notebooks() -> list[str]:
    """The ordered notebooks that exist on disk."""
    return [n for n in NOTEBOOKS if (NOTEBOOK_DIR / f"{n}.ipynb").is_file()]


def plan_run(name: str) -> Run:
    """The run of ``PLAN`` called ``name``; a bare notebook name not in the plan becomes a plain run of it."""
    for run in PLAN:
        if run.name == name:
            return run
    if name in NOTEBOOKS or (NOTEBOOK_DIR / f"{name}.ipynb").is_file():
        return Run(name, name)
    raise ValueError(f"unknown run {name!r}; the plan has {[r.name for r in PLAN]}")


_PARAMETER_CACHE: dict[tuple[str, float], dict[str, dict[str, Any]]] = {}


def notebook_parameters(name: str) -> dict[str, dict[str, Any]]:
    """The notebook's declared parameters (papermill's inspection: name -> type, default, help)."""
    import papermill

    path = notebook_path(name)
    key = (str(path), path.stat().st_mtime)
    if key not in _PARAMETER_CACHE:
        _PARAMETER_CACHE[key] = papermill.inspect_notebook(str(path))
    return _PARAMETER_CACHE[key]


# --- parameter types -----------------------------------------------------------------------------


def _split_optional(type_name: str) -> tuple[str, bool]:
    """``"Optional[float]"`` -> ``("float", True)``; ``"int"`` -> ``("int", False)``."""
    t = type_name.replace(" ", "")
    if t.startswith("Optional[") and t.endswith("]"):
        return t[len("Optional[") : -1], True
    return t, False


_TYPE_CHECKS: dict[str, Any] = {
    "int": lambda v: isinstance(v, int) and not isinstance(v, bool),
    "float": lambda v: isinstance(v, (int, float)) and not isinstance(v, bool),
    "str": lambda v: isinstance(v, str),
    "bool": lambda v: isinstance(v, bool),
    "list": lambda v: isinstance(v, (list, tuple)),
    "dict": lambda v: isinstance(v, dict),
}


def check_parameter_type(notebook: str, name: str, value: Any, type_name: str) -> Any:
    """``value`` if it fits the declared ``type_name`` (ints are accepted for floats and returned as floats).

    Undeclared or unknown annotations are not checked. Raises ValueError naming the parameter.
    """
    base, optional = _split_optional(type_name or "None")
    if base not in _TYPE_CHECKS or (optional and value is None):
        return value
    if not _TYPE_CHECKS[base](value):
        expected = f"{base} or None" if optional else base
        raise ValueError(
            f"parameter {name!r} of notebook {notebook!r} must be {expected} (declared `{name}: {type_name}`), "
            f"got {value!r} ({type(value).__name__})"
        )
    if base == "float" and isinstance(value, int):
        return float(value)
    return list(value) if base == "list" else value


def check_parameters(name: str, parameters: Mapping[str, Any]) -> dict[str, Any]:
    """Raise ValueError for a name ``name``'s parameters cell does not declare or a value of the wrong type.

    Returns the parameters with ints given for float parameters converted to float.
    """
    declared = notebook_parameters(name)
    unknown = sorted(set(parameters) - set(declared))
    if unknown:
        raise ValueError(f"unknown papermill parameter(s) {unknown} for notebook {name!r}; it declares {sorted(declared)}")
    return {k: check_parameter_type(name, k, v, declared[k].get("inferred_type_name", "None")) for k, v in parameters.items()}


def parse_cli_value(raw: str, type_name: str | None = None) -> Any:
    """A ``-p`` value: the text itself for ``str`` parameters, else a Python literal or, failing that, YAML.

    ``"100"`` -> 100, ``"1e-3"`` -> 0.001, ``"[1, 4]"`` -> [1, 4], ``"false"`` / ``"False"`` -> False,
    ``"null"`` / ``"None"`` -> None; text that is neither stays a string (the type check then reports it).
    """
    base, optional = _split_optional(type_name or "None")
    if base == "str":
        return None if optional and raw in ("None", "null") else raw
    try:
        return ast.literal_eval(raw)
    except (ValueError, SyntaxError):
        pass
    import yaml

    try:
        return yaml.safe_load(raw)
    except yaml.YAMLError:
        return raw


def load_parameter_file(path: str | os.PathLike) -> dict[str, Any]:
    """The mapping in a YAML or JSON file (JSON is YAML); raises ValueError if it is not a mapping."""
    import yaml

    path = Path(path)
    if not path.is_file():
        raise ValueError(f"parameter file not found: {path}")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise ValueError(f"parameter file {path} is not valid YAML/JSON: {exc}") from exc
    if data is None:
        return {}
    if not isinstance(data, dict) or not all(isinstance(k, str) for k in data):
        raise ValueError(f"parameter file {path} must hold a mapping of parameter (or notebook/run) names, got {type(data).__name__}")
    return data


def resolve_run_parameters(
    runs: Sequence[Run],
    *,
    file_parameters: Mapping[str, Any] | None = None,
    cli_parameters: Sequence[tuple[str, str]] = (),
) -> dict[str, dict[str, Any]]:
    """Explicit parameters for each run (before quick defaults and links), checked for names and types.

    See the module docstring for the precedence. Raises ValueError naming the parameter (and the
    notebook) for an unknown name or a wrong type, before anything runs.
    """
    file_parameters = dict(file_parameters or {})
    run_names = {r.name for r in PLAN} | {r.name for r in runs}
    notebook_names = set(NOTEBOOKS) | {r.notebook for r in runs}
    sections = {k: v for k, v in file_parameters.items() if k in run_names | notebook_names and isinstance(v, dict)}
    flat = {k: v for k, v in file_parameters.items() if k not in sections}
    for key, section in sections.items():
        if not any(key in (r.name, r.notebook) for r in runs):
            continue  # a section for a run that is not selected is simply not used
        target = next(r.notebook for r in runs if key in (r.name, r.notebook))
        declared = notebook_parameters(target)
        unknown = sorted(set(section) - set(declared))
        if unknown:
            raise ValueError(f"unknown papermill parameter(s) {unknown} in section {key!r} for notebook {target!r}; it declares {sorted(declared)}")

    declared_by = {r.name: notebook_parameters(r.notebook) for r in runs}
    flat_names = list(flat) + [name for name, _ in cli_parameters]
    unknown = sorted({n for n in flat_names if not any(n in d for d in declared_by.values())})
    if unknown:
        notebooks = sorted({r.notebook for r in runs})
        if len(notebooks) == 1:
            raise ValueError(f"unknown papermill parameter(s) {unknown} for notebook {notebooks[0]!r}; it declares {sorted(declared_by[runs[0].name])}")
        raise ValueError(f"unknown papermill parameter(s) {unknown}: none of the selected notebooks {notebooks} declares them")

    result: dict[str, dict[str, Any]] = {}
    for run in runs:
        declared = declared_by[run.name]
        params = {k: v for k, v in flat.items() if k in declared}
        if run.notebook in sections:
            params.update(sections[run.notebook])
        if run.name != run.notebook and run.name in sections:
            params.update(sections[run.name])
        for name, raw in cli_parameters:
            if name in declared:
                params[name] = parse_cli_value(raw, declared[name].get("inferred_type_name"))
        result[run.name] = check_parameters(run.notebook, params)
    return result


# --- execution -----------------------------------------------------------------------------------


@contextlib.contextmanager
def kernel_environment() -> Iterator[None]:
    """Environment the kernel inherits: headless progress bars and matplotlib's inline backend."""
    wanted = {"ESPER_HEADLESS": "1", "MPLBACKEND": INLINE_BACKEND}
    saved = {k: os.environ.get(k) for k in wanted}
    os.environ.update(wanted)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def run_notebook(
    name: str,
    parameters: dict[str, Any] | None = None,
    quick: bool = False,
    out_root: str | os.PathLike = DEFAULT_OUT_ROOT,
    kernel_name: str | None = None,
    progress: bool = False,
    cwd: str | os.PathLike | None = None,
) -> Path:
    """Execute one run of the plan (or a notebook by name); returns ``<out_root>/<run>/<notebook>.ipynb``.

    ``out_dir`` (when the notebook declares it) is set to ``<out_root>/<run>`` unless given.
    ``quick`` starts from ``QUICK_PARAMETERS[notebook]``; explicit ``parameters`` override it.
    The run's ``links`` point a notebook at what an earlier run saved under the same ``out_root``;
    a required link that is missing raises FileNotFoundError. ``cwd``: the kernel's working
    directory (default the repository root; notebooks resolve relative paths against the root anyway).
    """
    import papermill

    run = plan_run(name)
    params: dict[str, Any] = dict(QUICK_PARAMETERS.get(run.notebook, {})) if quick else {}
    params.update(parameters or {})
    out_root = Path(out_root).resolve()
    out_dir = out_root / run.name
    declared = notebook_parameters(run.notebook)
    if "out_dir" in declared:
        params.setdefault("out_dir", str(out_dir))
    for key, relative in run.links.items():
        linked = out_root / relative
        if key in params:
            continue
        if linked.is_file():
            params[key] = str(linked)
        elif run.require_links:
            raise FileNotFoundError(f"run {run.name!r} needs {key}={linked}, which does not exist: run the notebook that writes it first")
    params = check_parameters(run.notebook, params)
    out_dir.mkdir(parents=True, exist_ok=True)
    output = out_dir / f"{run.notebook}.ipynb"
    with kernel_environment():
        papermill.execute_notebook(
            str(notebook_path(run.notebook)),
            str(output),
            parameters=params,
            kernel_name=kernel_name or default_kernel(),
            cwd=str(cwd or REPO_ROOT),
            progress_bar=progress,
        )
    return output


def default_kernel() -> str:
    """The project's registered kernel if installed in this environment, else ``python3``."""
    from jupyter_client.kernelspec import KernelSpecManager

    return KERNEL_NAME if KERNEL_NAME in KernelSpecManager().find_kernel_specs() else "python3"


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m esper_lib.notebooks.runner",
        description="Execute the workbook's notebooks headless (papermill) into <out-root>/<run>/.",
        epilog="runs: " + ", ".join(r.name for r in PLAN),
    )
    parser.add_argument("--quick", action="store_true", help="start from each notebook's quick parameters (seconds per notebook)")
    parser.add_argument("--only", nargs="+", default=None, metavar="RUN", help="runs to execute, in plan order (default: all)")
    parser.add_argument("--out-root", default=str(DEFAULT_OUT_ROOT), help="where executed notebooks and figures go (default: artefacts/)")
    parser.add_argument("-p", "--parameter", nargs=2, action="append", default=[], metavar=("NAME", "VALUE"), help="set a parameter (repeatable)")
    parser.add_argument("-f", "--parameter-file", default=None, metavar="FILE", help="YAML or JSON file of parameters, flat or keyed by notebook/run name")
    parser.add_argument("--list", action="store_true", help="print the plan and exit")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    if args.list:
        for run in PLAN:
            links = ", ".join(f"{k} <- {v}" for k, v in run.links.items())
            print(f"{run.name:28s} notebooks/{run.notebook}.ipynb  {run.description}{f'  ({links})' if links else ''}")
        return 0
    known = [r.name for r in PLAN]
    if args.only:
        bad = [n for n in args.only if n not in known]
        if bad:
            parser.error(f"--only: unknown run(s) {bad}; the plan has {known}")
        runs = [r for r in PLAN if r.name in args.only]
    else:
        runs = [r for r in PLAN if (NOTEBOOK_DIR / f"{r.notebook}.ipynb").is_file()]
    try:
        file_parameters = load_parameter_file(args.parameter_file) if args.parameter_file else {}
        explicit = resolve_run_parameters(runs, file_parameters=file_parameters, cli_parameters=[tuple(p) for p in args.parameter])
    except ValueError as exc:
        parser.error(str(exc))
    for run in runs:
        start = time.perf_counter()
        shown = ", ".join(f"{k}={v!r}" for k, v in explicit[run.name].items())
        print(f"[run] {run.name} (notebooks/{run.notebook}.ipynb{'; ' + shown if shown else ''}) ...", flush=True)
        output = run_notebook(run.name, explicit[run.name], quick=args.quick, out_root=args.out_root, progress=True)
        print(f"[run] {run.name} done in {time.perf_counter() - start:.1f} s -> {output.parent}", flush=True)
    print(f"Executed notebooks, figures and tables are under {Path(args.out_root).resolve()}/<run>/")
    return 0


if __name__ == "__main__":
    sys.exit(main())
