"""Notebook helpers: repository-relative paths, figures saved and displayed, headless progress bars."""
from __future__ import annotations

from pathlib import Path

import matplotlib.pyplot as plt
import pytest
from matplotlib.figure import Figure

from esper_lib.notebooks import helpers as nh

REPO_ROOT = Path(__file__).resolve().parent.parent


def test_repo_root_is_found_from_a_subfolder(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(REPO_ROOT / "notebooks")
    assert nh.repo_root() == REPO_ROOT
    assert nh.resolve_path("artefacts/01_build_v2_model") == REPO_ROOT / "artefacts" / "01_build_v2_model"


def test_resolve_path_keeps_absolute_paths_and_rejects_empty(tmp_path: Path) -> None:
    assert nh.resolve_path(tmp_path / "x.pt") == tmp_path / "x.pt"
    assert nh.resolve_path("a/b", root=tmp_path) == tmp_path / "a" / "b"
    with pytest.raises(ValueError, match="non-empty path"):
        nh.resolve_path("")


def test_show_and_save_writes_a_png_and_closes_the_pyplot_figure(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    shown = []
    monkeypatch.setattr("IPython.display.display", lambda obj: shown.append(obj))
    fig, ax = plt.subplots()
    ax.plot([0, 1], [0, 1])
    path = tmp_path / "sub" / "line.png"
    assert nh.show_and_save(fig, path) is None  # a cell ending with the call shows only the figure
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert len(shown) == 1 and shown[0].data == path.read_bytes()
    assert fig.number not in plt.get_fignums()
    nh.show_and_save(Figure(), tmp_path / "plain.png")  # a figure outside pyplot works too
    with pytest.raises(ValueError, match="must end in .png"):
        nh.show_and_save(Figure(), tmp_path / "x.pdf")


def test_headless_progress_bar_ends_on_a_full_text_line(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setenv(nh.HEADLESS_ENV, "1")
    assert nh.is_headless()
    with nh.progress_bar(total=12, desc="steps") as bar:
        for _ in range(12):
            bar.update(1)
    last = [line for line in capsys.readouterr().out.replace("\r", "\n").split("\n") if line.strip()][-1]
    assert "100%" in last and "12/12" in last and last.startswith("steps")
    assert list(nh.progress_bar(range(3), desc="it")) == [0, 1, 2]
