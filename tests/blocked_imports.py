"""Make packages uninstalled for one process: ``BLOCK=torch,transformers python -c "import
tests.blocked_imports; ..."`` or ``pytest -p tests.blocked_imports``. Importing a blocked
package (or any of its submodules) raises ``ModuleNotFoundError``, as where it is not installed.
"""

from __future__ import annotations

import os
import sys
from importlib.abc import MetaPathFinder

BLOCKED = tuple(name for name in os.environ.get("BLOCK", "").split(",") if name)


class Blocker(MetaPathFinder):
    def find_spec(self, fullname, path=None, target=None):
        if fullname.partition(".")[0] in BLOCKED:
            raise ModuleNotFoundError(f"No module named {fullname!r} (blocked)", name=fullname)
        return None


if BLOCKED:
    already = sorted(m for m in sys.modules if m.partition(".")[0] in BLOCKED)
    assert not already, f"imported before the block: {already}"
    sys.meta_path.insert(0, Blocker())
