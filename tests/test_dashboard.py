"""The browser pages in a real browser: Debian's chromium driven by Playwright, against a real
server. The dashboard loads, takes a key, shows a model once it is loaded, draws a chart after
requests and a loss curve after training; Swagger UI renders the API offline. Screenshots go
to $MSC_TEST_OUTPUT (CI) or the test's tmp_path."""
import json
import os
import shutil
from pathlib import Path
from urllib.parse import urlparse

import pytest
from live_server import LiveServer

from msmartcompute.client import MSmartComputeClient

CHROMIUM = os.environ.get("MSC_CHROMIUM", "/usr/bin/chromium")
ADMIN_KEY = "msc_dashadmin_" + "d" * 32


def _browser_or_skip():
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        sync_playwright = None
    missing = "the playwright package" if sync_playwright is None else (
        None if shutil.which(CHROMIUM) else f"chromium at {CHROMIUM}")
    if missing:
        if os.environ.get("MSC_REQUIRE_BROWSER"):
            pytest.fail(f"MSC_REQUIRE_BROWSER is set but {missing} is missing")
        pytest.skip(f"needs {missing} (CI installs both)")
    return sync_playwright


@pytest.fixture(scope="module")
def browser():
    sync_playwright = _browser_or_skip()
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=[
            "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
            "--disable-sync", "--no-first-run"])
        yield browser
        browser.close()


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    state = tmp_path_factory.mktemp("dashboard")
    config = state / "server.json"  # a history sample every 0.5 s so the charts fill within the test
    config.write_text(json.dumps({"inference": {"metrics_sample_interval_s": 0.5}}))
    live = LiveServer(state / "state", extra_args=["--config", str(config)], env={"MSC_ADMIN_KEY": ADMIN_KEY},
                      log_file=state / "server.log")
    yield live
    live.stop()


@pytest.fixture
def output_dir(tmp_path):
    out = Path(os.environ.get("MSC_TEST_OUTPUT") or tmp_path)
    out.mkdir(parents=True, exist_ok=True)
    return out


def _page(browser, server):
    """A page that may reach only the server under test: anything else is recorded and refused."""
    page = browser.new_page(viewport={"width": 1400, "height": 1100})
    outside = []

    def route(r):
        if urlparse(r.request.url).netloc == urlparse(server.base_url).netloc:
            r.continue_()
        else:
            outside.append(r.request.url)
            r.abort()

    page.route("**/*", route)
    errors = []
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    return page, outside, errors


def test_dashboard_live(browser, server, output_dir):
    page, outside, errors = _page(browser, server)
    page.goto(server.base_url + "/dashboard")
    assert page.title() == "MSmartCompute dashboard"
    page.wait_for_selector("#health.healthy")
    page.wait_for_function("document.getElementById('status').textContent.includes('admin API key')")
    page.fill("#key", ADMIN_KEY)
    page.click("#key-form button[type=submit]")
    page.wait_for_function("window.dashboard.updated > 0 && document.getElementById('status').textContent === ''")
    assert page.evaluate("sessionStorage.getItem('msc_admin_key')") == ADMIN_KEY
    assert "no model loaded" in page.inner_text("#models")

    client = MSmartComputeClient(server.base_url + "/api/v1", ADMIN_KEY)
    client.create_virtual_gpu("vgpu-dash", memory_size=64 << 20, compute_units=1)
    client.load_model({"model_id": "dash-mlp", "model_type": "mlp", "virtual_gpu_id": "vgpu-dash",
                       "parameters": {"input_size": 4, "hidden_sizes": [16], "output_size": 2}})
    page.wait_for_selector("#models td:text-is('dash-mlp')", timeout=15_000)
    assert "vgpu-dash" in page.inner_text("#vgpus") and "64.0 MiB" in page.inner_text("#vgpus")

    for _ in range(40):
        client.inference("dash-mlp", [[0.1, 0.2, 0.3, 0.4]] * 3)
    job = client.train_async("dash-mlp", [[0, 1, 0, 1], [1, 0, 1, 0]], labels=[0, 1], epochs=6)
    client.wait(job["request_id"], kind="training")
    # a throughput chart with real points above zero, the model's own rate, and a loss curve
    page.wait_for_function(
        "Number(document.querySelector('[data-chart=throughput]').dataset.max) > 0", timeout=20_000)
    page.wait_for_function(
        "Number(document.querySelector('[data-chart=loss]').dataset.points) === 6", timeout=20_000)
    assert page.locator("[data-chart=throughput] canvas").count() == 1
    row = page.inner_text("#models tbody tr")
    assert "dash-mlp" in row and "1×40" in row  # 40 calls one after another: 40 runs of one request
    assert job["request_id"] in page.inner_text("#jobs") and "6/6 epochs" in page.inner_text("#jobs")
    page.screenshot(path=str(output_dir / "dashboard.png"), full_page=True)
    assert not outside and not errors, (outside, errors)
    page.close()


def test_api_docs_render_offline_without_a_key(browser, server, output_dir):
    page, outside, errors = _page(browser, server)
    page.goto(server.base_url + "/api/v1/docs")
    page.wait_for_selector(".swagger-ui .info .title", timeout=20_000)
    assert "MSmartCompute" in page.inner_text(".swagger-ui .info .title")
    page.wait_for_selector(".opblock")
    assert page.locator(".opblock").count() >= 20
    assert page.get_by_text("/api/v1/inference/batch", exact=True).count() >= 1
    page.screenshot(path=str(output_dir / "api-docs.png"))
    assert not outside and not errors, (outside, errors)
    page.close()
