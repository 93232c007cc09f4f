"""The load benchmark: our server against a bare Falcon app and TorchServe, and dynamic batching
off vs on, measured side by side in one run on this machine. Writes one JSON result file.

    python -m benchmarks.serving.run --machine "2-core x86_64, no GPU" --out benchmarks/results/x.json

Cases (each server is its own process group on a loopback port, all started and then warmed
with --warmup-seconds of load at the highest concurrency before measuring;
for every round and concurrency the targets are measured one after the other, so a ratio is
always taken between neighbouring measurements; the servers not under load are paused with
SIGSTOP: benchmarks/harness.py):
  overhead  mlp_small (256 -> 512 -> 512 -> 10): ours (auth + rate limits on) / bare / torchserve
  batching  --batching-model (default mlp_xl, 256 -> 4096 x3 -> 10): ours with default settings
            (batching_on: no tuning at all) against the same with max_queue_delay_ms 0 (batching_off).
            mlp_heavy (hidden 2048) is too light here: see benchmarks/README.md
Each row has the server's CPU per request (every process of the server, user + system), its
split by process role (our engine / fronts; TorchServe's Java frontend / Python workers), and the
share of the machine's CPU time left idle meanwhile (the load generator runs on the same cores:
a server can be slower with less CPU per request when its processes leave cores idle).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
from pathlib import Path
import tempfile

import numpy as np
import torch

from ..harness import Goal, Servers, judge, progress, write_result
from . import model as models
from . import targets
from .loadgen import run_load

GOALS = [
    Goal("requests_per_s", "ours", "bare", ">=", 0.85, {"case": "overhead", "concurrency": 1}),
    Goal("requests_per_s", "ours", "bare", ">=", 0.85, {"case": "overhead", "concurrency": 8}),
    Goal("requests_per_s", "ours", "torchserve", ">=", 1.0, {"case": "overhead", "concurrency": 8}),
    Goal("requests_per_s", "ours", "torchserve", ">=", 1.0, {"case": "overhead", "concurrency": 32}),
    Goal("requests_per_s", "ours", "ours", ">=", 1.0, {"case": "overhead", "concurrency": 32}, {"concurrency": 8}),
    Goal("requests_per_s", "batching_on", "batching_off", ">=", 3.0, {"case": "batching", "concurrency": 32}),
    # batching must not buy its throughput with tail latency
    Goal("p99_ms", "batching_on", "batching_off", "<=", 2.0, {"case": "batching", "concurrency": 32}),
]


def start_case(case: str, work: Path, args, servers: Servers) -> tuple[dict, str]:
    """Start the servers of one case into `servers`; returns ({name: loadgen Target}, model name)."""
    tgts = {}
    name = "mlp_small" if case == "overhead" else args.batching_model
    weights_dir = work / "weights"
    weights = models.write_weights(name, weights_dir)
    spec = models.load_spec(name, weights)
    roots = {"model_roots": [str(weights_dir)]}

    def add(pair):
        servers.add(pair[1].name, pair[0])
        tgts[pair[1].name] = pair[1]

    if case == "overhead":
        add(targets.ours("ours", {**spec, "max_batch_size": 32}, work / "ours", {**roots, **args.runtime}))
        add(targets.bare("bare", name, weights, work / "bare", args.bare_threads))
        if "torchserve" in args.skip:
            progress("torchserve: skipped (--skip torchserve)")
        else:
            from .torchserve_target import available
            why = available()
            if why:
                progress(f"torchserve: not run: {why}")
            else:
                add(targets.torchserve("torchserve", name, weights, work / "torchserve"))
    else:  # default settings: no max_batch_size, delay or thread count of ours
        add(targets.ours("batching_off", spec, work / "off", {**roots, "max_queue_delay_ms": 0}))
        add(targets.ours("batching_on", spec, work / "on", roots))
    return tgts, name


def table(runs: list[dict]) -> str:
    lines = [f"{'case':<9} {'target':<13} {'c':>3} {'req/s':>9} {'p50 ms':>8} {'p99 ms':>8} "
             f"{'cpu ms/req':>10} {'idle':>5} {'errors':>6}  cpu by process (ms/req)"]
    for r in runs:
        split = ", ".join(f"{k} {v:.3f}" for k, v in sorted(r["server_cpu_ms_per_request_by_process"].items())
                          if v >= 0.0005)
        lines.append(f"{r['case']:<9} {r['target']:<13} {r['concurrency']:>3} {r['requests_per_s']:>9.1f} "
                     f"{r['p50_ms']:>8.2f} {r['p99_ms']:>8.2f} {r['server_cpu_ms_per_request']:>10.3f} "
                     f"{r['machine_idle']:>5.0%} {r['errors']:>6}  {split}")
    return "\n".join(lines)


def measure(case: str, name: str, target, proc, inputs, expected, rnd: int, c: int, args) -> dict:
    """One load at concurrency c; the row with the server's CPU per request, whole and by process."""
    sid = proc.process.pid
    cpu0, idle0 = targets.session_cpu_by_role(sid), targets.machine_idle()
    res = run_load(target, inputs, expected, c, args.requests, args.seconds, warmup=3,
                   atol=1e-3 * float(np.abs(expected).max()), rtol=1e-3)
    cpu1, idle1 = targets.session_cpu_by_role(sid), targets.machine_idle()
    n = max(1, res.requests)
    if res.errors:  # the server's own account, before its folder goes
        progress(f"{target.name} c={c}: {res.errors} errors ({res.first_error}); the end of its log:\n"
                 + proc.log_path.read_text(errors="replace")[-3000:])
    split = {role: 1000 * (cpu1[role] - cpu0.get(role, 0.0)) / n for role in cpu1}
    return {"case": case, "model": name, "round": rnd, **res.to_dict(),
            "server_cpu_ms_per_request": sum(split.values()), "server_cpu_ms_per_request_by_process": split,
            "machine_idle": (idle1[0] - idle0[0]) / max(1, idle1[1] - idle0[1])}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--machine", default=f"{platform.machine()}", help="machine label stored in the result")
    p.add_argument("--out", help="result JSON path")
    p.add_argument("--cases", default="overhead,batching")
    p.add_argument("--concurrency", default="1,8,32")
    # large enough that --seconds ends a measurement: 3000 requests took 0.6 s at c=32, and so short a
    # measurement let one disturbed round decide a goal
    p.add_argument("--requests", type=int, default=50_000, help="request budget per measurement")
    p.add_argument("--seconds", type=float, default=5.0, help="time limit per measurement")
    # five: one round of identical code moved by +-10% with the machine (benchmarks/README.md,
    # "Serving v9"), so three rounds near a goal's line could not tell which side it is on
    p.add_argument("--rounds", type=int, default=5, help="repeat every measurement; goals take the median")
    p.add_argument("--warmup-seconds", type=float, default=15.0,
                   help="load on every server before the first round (TorchServe's Java gets faster for ~30 s)")
    p.add_argument("--bare-threads", type=int, default=8)
    p.add_argument("--runtime", type=json.loads, default={}, help="extra [inference] settings for 'ours' (JSON)")
    p.add_argument("--skip", default="", help="comma list of targets to skip (torchserve)")
    p.add_argument("--batching-model", default="mlp_xl", choices=list(models.MODELS))
    p.add_argument("--torch-threads", type=int, default=None,
                   help="OMP_NUM_THREADS for every server (ours, bare, TorchServe workers); default: torch's own")
    args = p.parse_args(argv)
    args.skip = set(filter(None, args.skip.split(",")))
    if args.torch_threads:  # inherited by every server process started below
        os.environ["OMP_NUM_THREADS"] = str(args.torch_threads)
    concs = [int(c) for c in args.concurrency.split(",")]
    runs: list[dict] = []
    rng = np.random.default_rng(0)
    with tempfile.TemporaryDirectory(prefix="msc-load-") as tmp:
        for case in args.cases.split(","):
            work = Path(tmp) / case
            progress(f"[{case}] starting servers ...")
            with Servers() as servers:
                tgts, name = start_case(case, work, args, servers)
                module = models.load(name, work / "weights" / f"{name}.safetensors")
                inputs = rng.standard_normal((64, models.MODELS[name][0])).astype(np.float32)
                with torch.inference_mode():
                    expected = module(torch.from_numpy(inputs)).numpy()
                for t, target in tgts.items():  # every server at its steady state (TorchServe's JIT) first
                    servers.only(t)
                    progress(f"[{case}] warming {t}: {args.warmup_seconds:.0f} s at c={max(concs)}")
                    run_load(target, inputs, expected, max(concs), 10 ** 9, args.warmup_seconds,
                             atol=1e-3 * float(np.abs(expected).max()), rtol=1e-3)
                total, step = args.rounds * len(concs) * len(tgts), 0
                for rnd in range(args.rounds):
                    for c in concs:
                        for t, target in tgts.items():
                            servers.only(t)
                            row = measure(case, name, target, servers.procs[t], inputs, expected, rnd, c, args)
                            runs.append(row)
                            step += 1
                            progress(f"[{'#' * (20 * step // total):<20}] {step}/{total} {case} round {rnd} "
                                     f"c={c:<3} {t:<13} {row['requests_per_s']:8.1f} req/s "
                                     f"p50 {row['p50_ms']:7.2f} ms p99 {row['p99_ms']:7.2f} ms "
                                     f"cpu {row['server_cpu_ms_per_request']:.2f} ms/req errors {row['errors']}"
                                     + (f" ({row['first_error']})" if row['first_error'] else ""))
    print(table(runs))
    goals = judge(GOALS, runs)
    write_result(args.out, "serving-load", args.machine, vars(args), runs, goals)
    return 0 if all(r["errors"] == 0 for r in runs) else 1


if __name__ == "__main__":
    sys.exit(main())
