"""Progress bars for long loops: a live widget in JupyterLab, plain text that ends at 100% headless.

``progress_bar(...)`` takes tqdm's arguments. Headless means ``ESPER_HEADLESS=1`` (the notebook
runner sets it for its kernels) or no IPython kernel: then the bar is tqdm's text bar on stdout,
redrawn at most every 5 s, whose last line is its final state, so an executed notebook shows
"100%| n/n" rather than a frozen widget's "0%". The trainer, the evaluation harness and the
schedule search use it, so notebooks get the right kind of bar without doing anything.
"""
from __future__ import annotations

import os
import sys
from collections.abc import Iterable
from typing import Any

HEADLESS_ENV = "ESPER_HEADLESS"


def is_headless() -> bool:
    """True when no live widget frontend should be assumed: ``ESPER_HEADLESS=1`` or no IPython kernel."""
    if os.environ.get(HEADLESS_ENV, "").strip().lower() in ("1", "true", "yes"):
        return True
    ipython = sys.modules.get("IPython")
    shell = ipython.get_ipython() if ipython is not None and hasattr(ipython, "get_ipython") else None
    return shell is None or getattr(shell, "kernel", None) is None


def progress_bar(iterable: Iterable[Any] | None = None, *, total: int | None = None, desc: str | None = None,
                 unit: str = "it", disable: bool = False, leave: bool = True, **kwargs: Any) -> Any:
    """A tqdm bar: a widget in a live notebook, plain text (on stdout) headless.

    Same arguments as ``tqdm`` (``iterable``, ``total``, ``desc``, ``unit``, ``disable``, ``leave``,
    ...). Headless bars redraw at most every 5 s (an executed notebook keeps every redraw in its
    stream output) and print their final state when closed; use the bar as a context manager or
    call ``close()``. ``leave`` defaults to True so the last line stays visible.
    """
    if is_headless():
        from tqdm.std import tqdm as text_tqdm

        kwargs.setdefault("file", sys.stdout)
        kwargs.setdefault("mininterval", 5.0)
        kwargs.setdefault("dynamic_ncols", False)
        kwargs.setdefault("ncols", 100)
        return text_tqdm(iterable, total=total, desc=desc, unit=unit, disable=disable, leave=leave, **kwargs)
    from tqdm.auto import tqdm as auto_tqdm

    return auto_tqdm(iterable, total=total, desc=desc, unit=unit, disable=disable, leave=leave, **kwargs)
