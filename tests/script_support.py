"""Load a file of ``scripts/`` (or ``benchmarks/``) as a module, so tests can call its ``main()`` and helpers."""
import importlib.util
from pathlib import Path
from types import ModuleType

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = ROOT / "scripts"


def load_script(name: str, folder: str = "scripts") -> ModuleType:
    """``<folder>/<name>.py`` imported under the module name ``name``."""
    spec = importlib.util.spec_from_file_location(name, ROOT / folder / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
