"""The GPU scripts' JSON output, rewritten after every measured row: run_all.sh stops a script
at its time limit, and what it measured until then must survive (the device keeps nothing)."""
from __future__ import annotations

import json
import os


def write_json(path: str | None, report: dict) -> None:
    """Replace `path` atomically (a kill mid-write leaves the previous version, not half a file)."""
    if not path:
        return
    tmp = f"{path}.partial"
    with open(tmp, "w") as f:
        json.dump(report, f, indent=1)
    os.replace(tmp, path)
