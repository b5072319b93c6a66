"""Real-browser check of notebook 03's explorer: JupyterLab + headless Chromium, driven over CDP.

Skipped unless ``ESPER_BROWSER_TESTS=1`` (and Chromium plus ``websocket-client`` are available).
It prepares a copy of the notebook with quick parameters (papermill ``prepare_only``), serves it
with JupyterLab, runs all cells in the browser, presses the right-arrow key on the step slider's
handle, and waits for the plots (the PNGs inside the ``Image`` widgets) and the status line to change.
"""
from __future__ import annotations

import json
import os
import secrets
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

pytestmark = [
    pytest.mark.browser,
    pytest.mark.skipif(os.environ.get("ESPER_BROWSER_TESTS") != "1", reason="set ESPER_BROWSER_TESTS=1 to run browser tests"),
]

REPO_ROOT = Path(__file__).resolve().parent.parent
NOTEBOOK = REPO_ROOT / "notebooks" / "03_value_landscape.ipynb"
QUICK = {"max_epochs": 5, "batches_per_epoch": 2, "sweep_points": 7}


def _chromium() -> str:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        path = shutil.which(name)
        if path:
            return path
    pytest.skip("no chromium executable on PATH (Debian: apt-get install chromium)")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait(predicate: Callable[[], Any], timeout: float, what: str, interval: float = 0.5) -> Any:
    deadline = time.monotonic() + timeout
    last_exc: Exception | None = None
    while time.monotonic() < deadline:
        try:
            value = predicate()
            if value:
                return value
        except Exception as exc:  # the server or page may not be up yet
            last_exc = exc
        time.sleep(interval)
    raise TimeoutError(f"timed out after {timeout:.0f} s waiting for {what} (last error: {last_exc!r})")


class _Page:
    """Minimal Chrome DevTools Protocol client for one page target."""

    def __init__(self, ws_url: str):
        import websocket

        self.ws = websocket.create_connection(ws_url, timeout=60, suppress_origin=True)
        self._id = 0

    def call(self, method: str, **params: Any) -> dict[str, Any]:
        self._id += 1
        self.ws.send(json.dumps({"id": self._id, "method": method, "params": params}))
        while True:
            msg = json.loads(self.ws.recv())
            if msg.get("id") == self._id:
                if "error" in msg:
                    raise RuntimeError(f"CDP {method} failed: {msg['error']}")
                return msg.get("result", {})

    def js(self, expression: str) -> Any:
        result = self.call("Runtime.evaluate", expression=expression, awaitPromise=True, returnByValue=True)
        if "exceptionDetails" in result:
            raise RuntimeError(f"JS error in {expression[:80]!r}: {result['exceptionDetails']}")
        return result["result"].get("value")

    def key(self, key: str, code: str, key_code: int) -> None:
        for kind in ("keyDown", "keyUp"):
            self.call("Input.dispatchKeyEvent", type=kind, key=key, code=code, windowsVirtualKeyCode=key_code)

    def close(self) -> None:
        self.ws.close()


# JS helpers evaluated in the page (JupyterLab 4 with --expose-app-in-browser).
# The notebook panel: the main-area widget with a kernel session (headless pages have no current widget).
_PANEL = """(window.jupyterapp ? Array.from(window.jupyterapp.shell.widgets('main')).find(w => w.sessionContext && w.content) : null)"""

_NOTEBOOK_STATE = """(() => {
  const w = """ + _PANEL + """;
  if (!w || !w.sessionContext.session) return null;
  const kernel = w.sessionContext.session.kernel;
  const cells = w.content.widgets.filter(c => c.model.type === 'code');
  const errors = [];
  for (const c of cells) for (let i = 0; i < c.model.outputs.length; i++) {
    const o = c.model.outputs.get(i);
    if (o.type === 'error') errors.push(JSON.stringify(o.toJSON()).slice(0, 2000));
  }
  return {status: kernel ? kernel.status : 'none', executed: cells.every(c => c.model.executionCount !== null),
          ncells: cells.length, errors};
})()"""

_IMAGE_DIGESTS = """(async () => {
  const imgs = Array.from(document.querySelectorAll('img.widget-image'));
  const out = [];
  for (const img of imgs) {
    if (!img.src) { out.push(''); continue; }
    const buf = new Uint8Array(await (await fetch(img.src)).arrayBuffer());
    let h = 2166136261;
    for (const b of buf) { h ^= b; h = Math.imul(h, 16777619) >>> 0; }
    out.push(buf.length + ':' + h);
  }
  return out;
})()"""

_STATUS_TEXT = """Array.from(document.querySelectorAll('.widget-html-content')).map(e => e.textContent).join(' | ')"""


@pytest.fixture
def lab(tmp_path: Path):
    """A JupyterLab server rooted at ``tmp_path`` serving a quick copy of notebook 03; yields (url, token, name)."""
    pytest.importorskip("websocket")
    import papermill

    work = tmp_path / "lab"
    work.mkdir()
    name = "03_value_landscape_browser.ipynb"
    papermill.execute_notebook(
        str(NOTEBOOK), str(work / name), parameters={**QUICK, "out_dir": str(tmp_path / "out")}, prepare_only=True,
        kernel_name="esper-lib",
    )
    port, token = _free_port(), secrets.token_hex(16)
    env = {**os.environ, "MPLBACKEND": "Agg"}
    server = subprocess.Popen(
        [sys.executable, "-m", "jupyterlab", "--no-browser", f"--port={port}", "--ServerApp.ip=127.0.0.1",
         f"--IdentityProvider.token={token}", f"--ServerApp.root_dir={work}", "--expose-app-in-browser",
         "--ServerApp.open_browser=False", "--allow-root", "--LabApp.extension_manager=readonly"],
        stdout=open(tmp_path / "lab.log", "wb"), stderr=subprocess.STDOUT, env=env, cwd=work,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        _wait(lambda: urllib.request.urlopen(f"{url}/api/status?token={token}", timeout=2).status == 200, 60, "JupyterLab to start")
        yield url, token, name
    finally:
        _stop(server)


def _stop(process: subprocess.Popen) -> None:
    """Terminate a helper process, killing it if it does not exit within 20 s."""
    process.terminate()
    try:
        process.wait(timeout=20)
    except subprocess.TimeoutExpired:
        process.kill()


@pytest.fixture
def page(tmp_path: Path):
    port = _free_port()
    browser = subprocess.Popen(
        [_chromium(), "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
         f"--remote-debugging-port={port}", f"--user-data-dir={tmp_path / 'chromium'}", "--window-size=1400,2400",
         "--disable-background-networking", "--disable-component-update", "--disable-sync", "--no-first-run",
         "--disable-quic", "about:blank"],
        stdout=subprocess.DEVNULL, stderr=open(tmp_path / "chromium.log", "wb"),
    )
    try:
        def target() -> str | None:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/json/list", timeout=2) as r:
                pages = [t for t in json.load(r) if t.get("type") == "page"]
            return pages[0]["webSocketDebuggerUrl"] if pages else None

        client = _Page(_wait(target, 60, "Chromium's DevTools endpoint"))
        try:
            yield client
        finally:
            client.close()
    finally:
        _stop(browser)


def test_step_slider_redraws_the_plots_in_jupyterlab(lab, page) -> None:
    url, token, name = lab
    page.call("Page.enable")
    page.call("Page.navigate", url=f"{url}/lab/tree/{name}?token={token}&reset")
    _wait(lambda: (page.js(_NOTEBOOK_STATE) or {}).get("status") == "idle", 120, "the notebook and its kernel to be ready")

    page.call("Emulation.setFocusEmulationEnabled", enabled=True)  # a headless page otherwise has no focus
    page.js("(() => { const w = " + _PANEL + "; window.jupyterapp.shell.activateById(w.id); return w.id; })()")
    page.js("window.jupyterapp.commands.execute('notebook:run-all-cells')")

    def finished() -> bool:
        state = page.js(_NOTEBOOK_STATE)
        assert not state["errors"], f"a cell failed in the browser: {state['errors']}"
        return state["executed"] and state["status"] == "idle"

    _wait(finished, 300, "all cells to run")
    digests = _wait(lambda: (d := page.js(_IMAGE_DIGESTS)) and len(d) >= 4 and all(d) and d, 60, "the explorer's plots to render")
    status_before = page.js(_STATUS_TEXT)
    handle = page.js(
        "(() => { const h = document.querySelector('.widget-slider .noUi-handle'); if (!h) return null;"
        " h.scrollIntoView({block: 'center'}); h.focus(); if (document.activeElement !== h) return null;"
        " return [Number(h.getAttribute('aria-valuenow')), Number(h.getAttribute('aria-valuemax'))]; })()"
    )
    assert handle, "the step slider's handle was not found or could not be focused"
    now, top = handle
    if now < top:
        page.key("ArrowRight", "ArrowRight", 39)
    else:
        page.key("ArrowLeft", "ArrowLeft", 37)

    def changed() -> list[str] | None:
        now = page.js(_IMAGE_DIGESTS)
        return now if sum(a != b for a, b in zip(now, digests)) >= 3 else None

    after = _wait(changed, 60, "the plots to redraw after moving the step slider")
    assert after != digests
    expected = f"Step {now + 1 if now < top else now - 1}:"
    status_after = _wait(lambda: (t := page.js(_STATUS_TEXT)) and expected in t and t, 30, f"the status line to show {expected!r}")
    assert status_after != status_before and "Could not" not in status_after
