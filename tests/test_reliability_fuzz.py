"""Schemathesis against the live server's own OpenAPI document: a fixed seed, bounded
examples, every check except `positive_data_acceptance` (a schema-valid body can still name
a model that is not loaded). A 5xx fails unless it is a documented deliberate refusal
(tests/fuzz_hooks.py). Slow: run by .ci/run (MSC_RELIABILITY_SLOW=1)."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from live_server import LiveServer
from reliability_helpers import quiet_env

pytestmark = pytest.mark.skipif(os.environ.get("MSC_RELIABILITY_SLOW") != "1",
                                reason="slow: run by .ci/run (MSC_RELIABILITY_SLOW=1)")
pytest.importorskip("schemathesis")

ADMIN_KEY = "msc_fuzzadmin_" + "f" * 32
TESTS = Path(__file__).parent


def test_fuzz_openapi(tmp_path):
    config = tmp_path / "server.json"
    # schemathesis' favourite ids are "0" and "00": models with those ids let generated
    # inference bodies reach a real forward
    config.write_text(json.dumps({"models": [
        {"model_id": "0", "model_type": "mlp", "parameters": {"input_size": 1, "hidden_sizes": [4], "output_size": 2}},
        {"model_id": "00", "model_type": "transformer", "max_sequence_length": 64,
         "parameters": {"vocab_size": 16, "hidden_size": 8, "num_heads": 2, "num_layers": 1}}]}))
    server = LiveServer(tmp_path / "state", extra_args=["--config", str(config)],
                        env=quiet_env(MSC_ADMIN_KEY=ADMIN_KEY, MSC_RATE_LIMIT_ENABLED="0"))
    try:
        run = subprocess.run(
            [str(Path(sys.executable).parent / "schemathesis"), "run", server.base_url + "/api/v1/openapi.json",
             "--checks", "all", "--exclude-checks", "not_a_server_error,positive_data_acceptance",
             "--max-examples", "20", "--seed", "3", "--no-shrink", "--workers", "1",
             "--header", f"Authorization: Bearer {ADMIN_KEY}", "--request-timeout", "30"],
            cwd=tmp_path, env={**os.environ, "SCHEMATHESIS_HOOKS": "fuzz_hooks", "PYTHONPATH": str(TESTS)},
            capture_output=True, text=True, timeout=170)
    finally:
        server.stop()
    log = server.process.stdout.read().decode()
    assert run.returncode == 0, run.stdout[-6000:] + run.stderr[-2000:]
    assert "passed" in run.stdout
    assert "Traceback" not in log, log[-4000:]
