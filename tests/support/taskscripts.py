"""The task scripts as modules, for unit tests of their pure parts.

They are loaded from the directory the service runs them from (`jobforge.tasks.templates_dir()`), by file, the way
`python3 <script>` runs them: each script puts its own directory on `sys.path` to find `_common`, so no test
has to.
"""

from __future__ import annotations

import importlib.util
import sys
from types import ModuleType

from jobforge.tasks import templates_dir


def load(name: str) -> ModuleType:
    """`templates/tasks/<name>.py` as a module, kept in sys.modules (dataclasses look it up). A script becomes
    `jobforge_task_<name>`; a shared helper (`_common`) keeps its own name, so the scripts importing it and the
    test share one module."""
    module_name = name if name.startswith("_") else f"jobforge_task_{name}"
    if module_name in sys.modules:
        return sys.modules[module_name]
    spec = importlib.util.spec_from_file_location(module_name, templates_dir() / "tasks" / f"{name}.py")
    module = sys.modules[module_name] = importlib.util.module_from_spec(spec)
    try:
        spec.loader.exec_module(module)
    except BaseException:
        del sys.modules[module_name]
        raise
    return module
