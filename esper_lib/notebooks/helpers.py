"""Small helpers every notebook uses: repository paths, figures shown *and* saved, progress bars.

- ``repo_root()`` / ``resolve_path(p)``: a relative parameter such as ``"artefacts/01_build_v2_model"``
  means the same folder whether the notebook runs under papermill from the repository root or is
  opened in JupyterLab from ``notebooks/``: relative paths resolve against the repository root (the
  nearest directory above the working directory that holds ``pyproject.toml``), absolute paths are
  kept.
- ``show_and_save(fig, path)``: writes the figure as PNG and puts the same PNG into the cell's
  output (an ``image/png`` output, whatever matplotlib backend the kernel has: Agg under a headless
  run, inline in JupyterLab), then closes the figure so pyplot does not draw it a second time.
- ``progress_bar(...)``: a tqdm bar that is a live widget in JupyterLab and plain text in headless
  runs (``ESPER_HEADLESS=1``, which ``esper_lib.notebooks.runner`` sets for its kernels, or no
  IPython kernel at all). The text bar writes to stdout and always ends on its final state
  (``100%|...| n/n``), so an executed notebook keeps a correct last line instead of a frozen
  widget's "0%".
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from matplotlib.figure import Figure

from esper_lib.progress import HEADLESS_ENV, is_headless, progress_bar  # noqa: F401 (re-exported for notebooks)
ROOT_MARKER = "pyproject.toml"


# --- paths -------------------------------------------------------------------------------------


def repo_root(start: str | os.PathLike | None = None) -> Path:
    """The nearest directory at or above ``start`` (default: the working directory) holding ``pyproject.toml``.

    Falls back to the checkout this package was imported from, so a notebook started from outside
    the repository still finds it. Raises FileNotFoundError if neither has the marker.
    """
    here = Path(start if start is not None else Path.cwd()).resolve()
    for candidate in (here, *here.parents):
        if (candidate / ROOT_MARKER).is_file():
            return candidate
    package_root = Path(__file__).resolve().parents[2]  # esper_lib/notebooks/helpers.py -> repository
    if (package_root / ROOT_MARKER).is_file():
        return package_root
    raise FileNotFoundError(f"no {ROOT_MARKER} at or above {here} (nor at {package_root}): cannot find the repository root")


def resolve_path(path: str | os.PathLike, root: str | os.PathLike | None = None) -> Path:
    """``path`` as an absolute path: kept if absolute, else taken relative to ``root`` (default ``repo_root()``).

    ``~`` is expanded. An empty path raises ValueError (an empty parameter usually means "none";
    test for it before resolving).
    """
    if path is None or str(path).strip() == "":
        raise ValueError("resolve_path needs a non-empty path")
    p = Path(path).expanduser()
    if p.is_absolute():
        return p
    return (Path(root) if root is not None else repo_root()) / p


def display_path(path: str | os.PathLike) -> str:
    """A short form of ``path`` for titles: relative to the repository root when inside it, else
    ``.../<folder>/<file>`` (the folder names the run, e.g. ``04_short_training``)."""
    p = Path(path)
    try:
        return str(p.resolve().relative_to(repo_root()))
    except (ValueError, FileNotFoundError):
        return str(Path("...", *p.parts[-2:])) if len(p.parts) > 2 else str(p)


# --- figures -----------------------------------------------------------------------------------


def show_and_save(fig: Figure, path: str | os.PathLike, *, dpi: int = 110, show: bool = True) -> None:
    """Save ``fig`` as PNG at ``path`` (relative paths via ``resolve_path``) and display that PNG in the cell.

    Works with figures from ``plt.subplots`` and with plain ``matplotlib.figure.Figure`` objects.
    The figure is closed in pyplot afterwards (no duplicate drawing at the end of the cell); the
    object itself stays usable. Returns None, so a cell ending with this call shows the figure and
    nothing else (the file is ``resolve_path(path)``).
    """
    if not isinstance(fig, Figure):
        raise TypeError(f"fig must be a matplotlib Figure, got {type(fig).__name__}")
    path = resolve_path(path)
    if path.suffix.lower() != ".png":
        raise ValueError(f"show_and_save writes PNG files; path must end in .png, got {path}")
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=dpi)
    if show:
        from IPython.display import Image, display

        display(Image(data=path.read_bytes(), format="png"))
    import matplotlib.pyplot as plt

    plt.close(fig)  # a no-op for figures pyplot does not manage


# --- progress ----------------------------------------------------------------------------------



__all__ = ["repo_root", "resolve_path", "display_path", "show_and_save", "is_headless", "progress_bar", "HEADLESS_ENV"]


def json_assignment(text: str) -> tuple[str, Any]:
    """``"NAME=JSON"`` -> ``(NAME, value)``: the ``--set`` / ``--env`` overrides of the scripts (argparse ``type``)."""
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"expected NAME=JSON_VALUE, got {text!r}")
    try:
        return key, json.loads(value)
    except json.JSONDecodeError as err:
        raise argparse.ArgumentTypeError(f"{key}: value {value!r} is not JSON ({err})") from err


def probe_parser(description: str, seeds: int, first_seed: int) -> argparse.ArgumentParser:
    """The arguments the env probe scripts share: repeatable ``--env ARG=JSON`` (``MorphoEnv`` overrides)
    and ``--seeds`` (how many env seeds, from ``first_seed``, each played by every controller)."""
    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--env", type=json_assignment, action="append", default=[], metavar="ARG=JSON", help="MorphoEnv override")
    parser.add_argument("--seeds", type=int, default=seeds, help=f"env seeds {first_seed}.. (paired with always-WAIT)")
    return parser


def probe_wait_baseline(args: argparse.Namespace, first_seed: int) -> tuple[Any, range, Any]:
    """``(env_fn, seeds, wait)`` for a probe script: the ``MorphoEnv`` factory with ``args.env``, the seeds
    ``first_seed..first_seed + args.seeds - 1`` and always-WAIT's results on them (``evaluate_controller``'s
    frame), torch on one thread. Exits with a message when ``args.seeds < 2`` (no standard error)."""
    from functools import partial

    import torch

    from esper_lib.envs.morpho import MorphoEnv
    from esper_lib.evaluation.baselines import AlwaysWaitController, evaluate_controller

    if args.seeds < 2:
        raise SystemExit("--seeds must be >= 2")
    torch.set_num_threads(1)
    env_fn = partial(MorphoEnv, **dict(args.env))
    seeds = range(first_seed, first_seed + args.seeds)
    return env_fn, seeds, evaluate_controller(AlwaysWaitController(), env_fn, seeds)


def mean_and_se(d: Iterable[float]) -> str:
    """``"+0.123 (SE 0.045)"``: the mean of paired differences ``d`` and its standard error (n - 1)."""
    import numpy as np

    x = np.asarray(list(d), dtype=float)
    return f"{x.mean():+.3f} (SE {x.std(ddof=1) / np.sqrt(len(x)):.3f})"
