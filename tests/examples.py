"""The guide's example services (examples/*/src/program.py) loaded as modules, and the pool ids
the tests use with them; shared by the refs, runtime and runtime-mount tests."""

from __future__ import annotations

import importlib.util
import sys
import uuid
from pathlib import Path
from types import ModuleType

REPO = Path(__file__).resolve().parent.parent
EXAMPLES = REPO / "examples"
ID1 = uuid.UUID("a1b2c3d4-e5f6-7890-1234-567890abcdef")
ID2 = uuid.UUID("b1b2c3d4-e5f6-7890-1234-567890abcdef")
ID3 = uuid.UUID("c1b2c3d4-e5f6-7890-1234-567890abcdef")


def examples_program(name: str) -> ModuleType:
    """examples/NAME/src/program.py, loaded once per test session."""
    module_name = f"_example_{name}_program"
    loaded = sys.modules.get(module_name)
    if loaded is not None:
        return loaded
    spec = importlib.util.spec_from_file_location(
        module_name, EXAMPLES / name / "src" / "program.py"
    )
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[module_name] = module
    spec.loader.exec_module(module)
    return module
