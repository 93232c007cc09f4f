"""`msmartcompute bench <suite>`: run a benchmark suite of the source checkout with a progress
bar and print a table of each measurement next to its baseline, with the ratio.

Suites: kernels (benchmarks/test_bench_*.py but runtime/http), runtime, http (pytest-benchmark
files), serving (the load benchmark, benchmarks/serving/run.py). Pairs: a benchmark whose
parameter value names a baseline (torch, unbatched, bare, ...) is the baseline of the ones that
differ from it only in that parameter.
"""
from __future__ import annotations

import contextlib
import io
import json
import re
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
BENCH_DIR = REPO / "benchmarks"
SUITES = ("kernels", "runtime", "http", "serving")
BASELINES = {"torch", "reference", "baseline", "unbatched", "bare", "eager", "bf16"}
# extra_info keys holding a rate, best first; without one the table shows calls/s (1 / median)
RATES = ("TFLOP/s", "GB/s", "tokens/s", "requests/s")


def cuda_time_ms(fn, warmup: int, reps: int) -> tuple[float, float]:
    """(median, min) milliseconds of fn() on the current CUDA stream, timed with CUDA events
    after `warmup` untimed calls; the GPU scripts in benchmarks/gpu/ share it."""
    import statistics

    import torch

    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times), min(times)


def suite_files(suite: str) -> list[Path]:
    if suite == "runtime":
        return [BENCH_DIR / "test_bench_runtime.py"]
    if suite == "http":
        return [BENCH_DIR / "test_bench_http.py"]
    return sorted(p for p in BENCH_DIR.glob("test_bench_*.py")
                  if p.name not in ("test_bench_runtime.py", "test_bench_http.py"))


class Progress:
    """A pytest plugin drawing `[#####.....] k/n name` on stderr."""

    def __init__(self, stream=sys.stderr, width: int = 30):
        self.stream, self.width = stream, width
        self.total, self.done, self.failed = 0, 0, []

    def pytest_collection_modifyitems(self, items):
        self.total = len(items)

    def pytest_runtest_logreport(self, report):
        if report.failed:
            self.failed.append((report.nodeid, str(report.longrepr)[-2000:]))
        if report.when == "teardown":
            self.done += 1
            self.draw(report.nodeid.split("::")[-1])

    def draw(self, label: str) -> None:
        filled = self.width * self.done // max(1, self.total)
        self.stream.write(f"\r[{'#' * filled}{'.' * (self.width - filled)}] {self.done}/{self.total} "
                          f"{label[:60]:<60}")
        if self.done == self.total:
            self.stream.write("\n")
        self.stream.flush()


def run_pytest_suite(suite: str, json_path: Path) -> tuple[int, Progress]:
    import pytest

    files = [str(f) for f in suite_files(suite) if f.exists()]
    if not files:
        raise SystemExit(f"no benchmark files for suite {suite!r} in {BENCH_DIR}")
    progress = Progress()
    sys.path.insert(0, str(REPO))
    log = io.StringIO()  # pytest's own report, shown only when something failed
    with contextlib.redirect_stdout(log):
        rc = pytest.main([*files, "-p", "no:cacheprovider", "--benchmark-only", f"--benchmark-json={json_path}",
                          "--rootdir", str(REPO)], plugins=[progress])
    if rc not in (0, 5):
        print(log.getvalue()[-6000:], file=sys.stderr)
    return int(rc), progress


def rate(bench: dict) -> tuple[float, str]:
    info = bench.get("extra_info") or {}
    for key in RATES:
        if isinstance(info.get(key), (int, float)):
            return float(info[key]), key
    return 1.0 / bench["stats"]["median"], "calls/s"


def table(benchmarks: list[dict]) -> str:
    """One row per non-baseline benchmark: its rate, its baseline's rate and the ratio."""
    rows = []
    by_fn: dict[str, list[dict]] = {}
    for b in benchmarks:
        by_fn.setdefault(b.get("name", "").split("[")[0], []).append(b)
    for fn, group in by_fn.items():
        role = None
        for b in group:
            for k, v in (b.get("params") or {}).items():
                if str(v) in BASELINES:
                    role = k
        base_of = {}
        if role:
            for b in group:
                params = dict(b.get("params") or {})
                if str(params.get(role)) in BASELINES:
                    params.pop(role)
                    base_of[json.dumps(params, sort_keys=True, default=str)] = b
        for b in group:
            params = dict(b.get("params") or {})
            if role and str(params.get(role)) in BASELINES:
                continue
            value, unit = rate(b)
            who = params.pop(role, None) if role else None
            base = base_of.get(json.dumps(params, sort_keys=True, default=str))
            label = re.sub(r"^test_", "", fn) + "[" + ",".join(
                f"{v}" for v in ([who] if who is not None else []) + list(params.values())) + "]"
            if base is not None:
                bvalue, bunit = rate(base)
                bname = str(base["params"][role])
                rows.append((label, f"{value:,.1f} {unit}", f"{bvalue:,.1f} {bunit} ({bname})",
                             f"{value / bvalue:.2f}x" if bunit == unit and bvalue > 0 else "-"))
            else:
                rows.append((label, f"{value:,.1f} {unit}", "-", "-"))
    head = ("benchmark", "ours", "baseline", "ratio")
    widths = [max(len(r[i]) for r in [head, *rows]) for i in range(4)]
    fmt = "  ".join(f"{{:<{w}}}" for w in widths)
    return "\n".join([fmt.format(*head), fmt.format(*("-" * w for w in widths))] + [fmt.format(*r) for r in rows])


def main(args) -> int:
    if not BENCH_DIR.is_dir():
        print(f"error: no benchmarks/ folder next to the package ({BENCH_DIR}): run from a source checkout",
              file=sys.stderr)
        return 2
    if args.suite == "serving":
        sys.path.insert(0, str(REPO))
        from benchmarks.serving import run as serving

        argv = ["--rounds", str(args.rounds), "--seconds", str(args.seconds)]
        if args.json:
            argv += ["--out", str(args.json)]
        if args.machine:
            argv += ["--machine", args.machine]
        return serving.main(argv)
    with tempfile.TemporaryDirectory() as tmp:
        json_path = Path(args.json) if args.json else Path(tmp) / "bench.json"
        rc, progress = run_pytest_suite(args.suite, json_path)
        for nodeid, text in progress.failed:
            print(f"FAILED {nodeid}\n{text}\n", file=sys.stderr)
        if json_path.exists():
            data = json.loads(json_path.read_text())
            print(table(data.get("benchmarks", [])))
            machine = data.get("machine_info", {})
            print(f"\nmachine: {machine.get('cpu', {}).get('brand_raw', machine.get('processor', '?'))}, "
                  f"{machine.get('cpu', {}).get('count', '?')} cores; {data.get('datetime', '')}")
    return rc


def add_parser(sub) -> None:
    b = sub.add_parser("bench", help="run a benchmark suite and print a table against the baselines")
    b.add_argument("suite", choices=SUITES)
    b.add_argument("--json", help="also save the raw results here (pytest-benchmark JSON, or the load result)")
    b.add_argument("--rounds", type=int, default=2, help="serving: repeat each measurement (spread)")
    b.add_argument("--seconds", type=float, default=5.0, help="serving: time limit per measurement")
    b.add_argument("--machine", help="serving: machine label stored in the result")
    b.set_defaults(func=main)
