"""Build hook: compile blit's C directory comparer, small-file copier, small-file framer and CBOR
container counter (src/blit/ffi/_scan.c, _copy.c, _frame.c, _cbor.c) with cffi.

Hatchling runs this for wheels and editable installs. The extension is optional: without a C
compiler the build still succeeds (with a warning) and blit uses its pure-Python scan. It must
not do anything else (no downloads, no code generation beyond the extension).
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

from hatchling.builders.hooks.plugin.interface import BuildHookInterface


class CustomBuildHook(BuildHookInterface):  # type: ignore[misc]
    def initialize(self, version: str, build_data: dict[str, Any]) -> None:
        ffi_dir = Path(self.root) / "src" / "blit" / "ffi"
        sys.path.insert(0, str(ffi_dir))
        try:
            import _build_scan

            so = _build_scan.build(ffi_dir)
        except Exception as exc:  # no compiler, no headers: the pure-Python path still works
            self.app.display_warning(f"blit: C directory comparer and copier not built ({exc}); using the pure-Python path")
            return
        finally:
            sys.path.pop(0)
        build_data["pure_python"] = False
        build_data["infer_tag"] = True
        if version != "editable":  # an editable install imports it from src/ directly
            build_data["force_include"][str(so)] = f"blit/ffi/{so.name}"
