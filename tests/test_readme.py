"""README.md's walk-through, run as pasted against a live server: its bash blocks in one
shell (the `make serve` line becomes the same server command on a free port), its Python
blocks in that shell's environment, in order."""
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from live_server import free_port

ROOT = Path(__file__).resolve().parent.parent


def walkthrough_blocks() -> list[tuple[str, str]]:
    text = (ROOT / "README.md").read_text()
    section = text.split("\n## Walk-through", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"```(bash|python)\n(.*?)```", section, re.S)


@pytest.mark.skipif(shutil.which("curl") is None, reason="the walk-through uses curl")
def test_readme_walkthrough_runs_as_pasted(tmp_path):
    blocks = walkthrough_blocks()
    assert [lang for lang, _ in blocks].count("bash") >= 4 and any(lang == "python" for lang, _ in blocks)
    port = free_port()
    serve = f'"{sys.executable}" -m msmartcompute serve --port {port} > server.log 2>&1 & echo $! > server.pid'
    script = ["set -euo pipefail", 'trap \'kill "$(cat server.pid)" 2>/dev/null || true\' EXIT']
    for lang, code in blocks:
        code = code.replace("127.0.0.1:8080", f"127.0.0.1:{port}").replace(".venv/bin/", f"{ROOT}/.venv/bin/")
        if lang == "bash":
            lines = code.splitlines()
            assert sum("make serve" in line for line in lines) <= 1
            script += [serve if "make serve" in line else line for line in lines]
        else:
            script.append(f'"{sys.executable}" - <<\'PYTHON\'\n{code}PYTHON')
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    env.pop("TRITON_INTERPRET", None)
    result = subprocess.run(["bash", "-c", "\n".join(script)], cwd=tmp_path, env=env, capture_output=True,
                            text=True, timeout=600)
    out = result.stdout
    log = (tmp_path / "server.log").read_text() if (tmp_path / "server.log").exists() else ""
    assert result.returncode == 0, f"{result.stderr}\n{out}\n{log[-3000:]}"
    assert '"success":false' not in out.replace(" ", ""), out
    assert out.count('"success":true') == 8, out  # each of the 8 printed curl answers is a success
    assert '"message":"Model loaded successfully"' in out and '"status":"completed"' in out
    assert '"target_precision":"int8"' in out.replace(" ", "")
    assert "INVALID_INPUT_DATA input_data rows must have 4 values" in out  # the SDK's typed error
    assert "iris-py" not in result.stderr
