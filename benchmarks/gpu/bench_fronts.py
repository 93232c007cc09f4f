"""HTTP throughput as front processes are added (#16): `msmartcompute serve --workers 1` against
`--workers N` on a small model (mlp_small, 256 -> 512 -> 512 -> 10), side by side, at one
concurrency, every server warmed first, medians of --rounds. The load generator runs in
--client-processes forked processes (one Python process cannot ask as fast as 8 fronts answer).
The goal on the 16-core GPU machine: 8 fronts >= 4x one front at c=64.

  python benchmarks/gpu/bench_fronts.py --out $OUT/bench_fronts.json
  python benchmarks/gpu/bench_fronts.py --out /tmp/f.json --workers 1,2 --concurrency 8 \
      --client-processes 2 --seconds 1 --rounds 1 --warmup-seconds 1   # a CPU smoke run

Needs the server stack (falcon, waitress, orjson, msgspec, greenlet), which the GPU machine
lacks: `make gpu-wheels` here, then carry `.whl` (run_all.sh installs it).
"""
from __future__ import annotations

import argparse
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # run as a script from the checkout
from benchmarks.gpu.report import write_json  # noqa: E402

SERVER_STACK = ("falcon", "waitress", "orjson", "msgspec", "greenlet")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="JSON file to write")
    p.add_argument("--workers", default="1,8", help="front counts to compare, the first is the baseline")
    p.add_argument("--concurrency", type=int, default=64)
    p.add_argument("--client-processes", type=int, default=8)
    p.add_argument("--seconds", type=float, default=5.0, help="per measurement")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--warmup-seconds", type=float, default=10.0)
    p.add_argument("--goal", type=float, default=4.0, help="the last front count over the first, at least")
    return p.parse_args(argv)


def run(args) -> dict:
    import numpy as np
    import torch

    from benchmarks.harness import Goal, Servers, judge
    from benchmarks.serving import model as models, targets
    from benchmarks.serving.loadgen import run_load

    counts = [int(w) for w in args.workers.split(",")]
    report = {"suite": "gpu-fronts", "settings": vars(args), "cpus": os.cpu_count(), "python": platform.python_version(),
              "torch": torch.__version__, "cuda": torch.version.cuda,
              "card": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
              "when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "rows": [], "complete": False}
    with tempfile.TemporaryDirectory(prefix="msc-fronts-") as tmp, Servers() as servers:
        weights = models.write_weights("mlp_small", Path(tmp) / "weights")
        spec = {**models.load_spec("mlp_small", weights), "max_batch_size": 32}
        tgts = {}
        for n in counts:
            proc, target = targets.ours(f"fronts_{n}", spec, Path(tmp) / f"w{n}",
                                        {"model_roots": [str(Path(tmp) / "weights")]}, extra_args=("--workers", str(n)))
            servers.add(target.name, proc)
            tgts[n] = target
        inputs = np.random.default_rng(0).standard_normal((64, 256)).astype(np.float32)
        with torch.inference_mode():
            expected = models.load("mlp_small", weights)(torch.from_numpy(inputs)).numpy()
        tolerance = {"atol": 1e-3 * float(np.abs(expected).max()), "rtol": 1e-3}

        def load(target, seconds):
            return run_load(target, inputs, expected, args.concurrency, 10 ** 9, seconds, warmup=3,
                            processes=args.client_processes, **tolerance)

        for n, target in tgts.items():
            servers.only(target.name)
            load(target, args.warmup_seconds)
        for rnd in range(args.rounds):
            for n, target in tgts.items():
                servers.only(target.name)
                res = load(target, args.seconds)
                report["rows"].append({"workers": n, "round": rnd, **res.to_dict()})
                write_json(args.out, report)
                print(f"round {rnd} fronts {n:>2}: {res.requests_per_s:9.1f} req/s p50 {res.p50_ms:6.2f} ms "
                      f"p99 {res.p99_ms:6.2f} ms errors {res.errors}", flush=True)
    report["goals"] = judge([Goal("requests_per_s", f"fronts_{counts[-1]}", f"fronts_{counts[0]}", ">=", args.goal,
                                  {"concurrency": args.concurrency})], report["rows"])
    report["errors"] = sum(r["errors"] for r in report["rows"])
    report["complete"] = True
    return report


def main(argv=None) -> int:
    args = parse_args(argv)
    missing = [m for m in SERVER_STACK if not _importable(m)]
    if missing:
        print(f"bench_fronts: the server stack is missing here ({', '.join(missing)}): run `make gpu-wheels` "
              "and carry .whl (benchmarks/gpu/run_all.sh installs it)", file=sys.stderr)
        return 2
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    report = run(args)
    write_json(args.out, report)
    print(f"wrote {args.out}")
    return 0 if report["errors"] == 0 else 1


def _importable(module: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(module) is not None


if __name__ == "__main__":
    sys.exit(main())
