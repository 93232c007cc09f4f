"""The load benchmark: our server against a bare Falcon app and TorchServe, and dynamic batching
off vs on, measured side by side in one run on this machine. Writes one JSON result file.

    python -m benchmarks.serving.run --machine "2-core x86_64, no GPU" --out benchmarks/results/x.json

Cases (each server is its own process on a loopback port, all started before measuring; for
every round and concurrency the targets are measured one after the other, so a ratio is always
taken between neighbouring measurements; the servers not under load are paused with SIGSTOP so
their background work, TorchServe's JVM above all, takes no CPU from the one measured):
  overhead  mlp_small (256 -> 512 -> 512 -> 10): ours (auth + rate limits on) / bare / torchserve
  batching  --batching-model (default mlp_xl, 256 -> 4096 x3 -> 10): ours with max_queue_delay_ms
            0 (off) / on. mlp_heavy (hidden 2048) is too light here: see benchmarks/README.md
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from . import model as models
from . import targets
from .loadgen import run_load

GOALS = [
    # (case, ours, baseline, concurrency, metric, minimum ratio)
    ("overhead", "ours", "bare", 1, "requests_per_s", 0.85),
    ("overhead", "ours", "bare", 8, "requests_per_s", 0.85),
    ("overhead", "ours", "torchserve", 8, "requests_per_s", 1.0),
    ("overhead", "ours", "torchserve", 32, "requests_per_s", 1.0),
    ("batching", "batching_on", "batching_off", 32, "requests_per_s", 3.0),
]


def machine_info(label: str) -> dict:
    cpu = platform.processor()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {"label": label, "cpu": cpu, "cores": os.cpu_count(), "arch": platform.machine(),
            "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
            "python": platform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda
            if torch.cuda.is_available() else None}


def progress(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def start_case(case: str, work: Path, args) -> tuple[list, list, str]:
    """Start the servers of one case; returns (processes, targets, model name)."""
    procs, tgts = [], []
    name = "mlp_small" if case == "overhead" else args.batching_model
    weights_dir = work / "weights"
    weights = models.write_weights(name, weights_dir)
    spec = models.load_spec(name, weights)
    roots = {"model_roots": [str(weights_dir)]}

    def add(pair):
        procs.append(pair[0])
        tgts.append(pair[1])

    try:
        if case == "overhead":
            add(targets.ours("ours", spec, work / "ours", {**roots, **args.runtime}, args.threads))
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
        else:
            add(targets.ours("batching_off", spec, work / "off", {**roots, "max_queue_delay_ms": 0},
                             args.batching_threads))
            add(targets.ours("batching_on", spec, work / "on",
                             {**roots, "max_queue_delay_ms": args.batch_delay_ms}, args.batching_threads))
    except BaseException:
        for p in procs:
            p.stop()
        raise
    return procs, tgts, name


def summarise(runs: list[dict]) -> list[dict]:
    """Each goal's ratio per round, with the median and the spread (min, max)."""
    out = []
    for case, ours, base, c, metric, goal in GOALS:
        by_round = {}
        for r in runs:
            if r["case"] == case and r["concurrency"] == c and r["target"] in (ours, base):
                by_round.setdefault(r["round"], {})[r["target"]] = r[metric]
        ratios = [v[ours] / v[base] for v in by_round.values() if ours in v and base in v and v[base] > 0]
        entry = {"case": case, "ours": ours, "baseline": base, "concurrency": c, "metric": metric, "goal": goal,
                 "ratios": ratios}
        if ratios:
            entry.update(median=statistics.median(ratios), min=min(ratios), max=max(ratios),
                         met=statistics.median(ratios) >= goal)
        out.append(entry)
    # batching: p99 with batching on must be no worse than 2x off at c=32
    p99 = {}
    for r in runs:
        if r["case"] == "batching" and r["concurrency"] == 32:
            p99.setdefault(r["round"], {})[r["target"]] = r["p99_ms"]
    ratios = [v["batching_on"] / v["batching_off"] for v in p99.values() if len(v) == 2]
    if ratios:
        out.append({"case": "batching", "ours": "batching_on", "baseline": "batching_off", "concurrency": 32,
                    "metric": "p99_ms (at most)", "goal": 2.0, "ratios": ratios,
                    "median": statistics.median(ratios), "min": min(ratios), "max": max(ratios),
                    "met": statistics.median(ratios) <= 2.0})
    return out


def table(runs: list[dict], goals: list[dict]) -> str:
    lines = [f"{'case':<9} {'target':<13} {'c':>3} {'req/s':>9} {'p50 ms':>8} {'p99 ms':>8} "
             f"{'cpu ms/req':>10} {'errors':>6}"]
    for r in runs:
        lines.append(f"{r['case']:<9} {r['target']:<13} {r['concurrency']:>3} {r['requests_per_s']:>9.1f} "
                     f"{r['p50_ms']:>8.2f} {r['p99_ms']:>8.2f} {r['server_cpu_ms_per_request']:>10.3f} "
                     f"{r['errors']:>6}")
    lines.append("")
    for g in goals:
        if "median" in g:
            lines.append(f"{g['ours']} / {g['baseline']} c={g['concurrency']} {g['metric']}: "
                         f"{g['median']:.2f}x (rounds {', '.join(f'{x:.2f}' for x in g['ratios'])}; "
                         f"goal {g['goal']}) {'MET' if g['met'] else 'NOT MET'}")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--machine", default=f"{platform.machine()}", help="machine label stored in the result")
    p.add_argument("--out", help="result JSON path")
    p.add_argument("--cases", default="overhead,batching")
    p.add_argument("--concurrency", default="1,8,32")
    p.add_argument("--requests", type=int, default=3000, help="request budget per measurement")
    p.add_argument("--seconds", type=float, default=5.0, help="time limit per measurement")
    p.add_argument("--rounds", type=int, default=2, help="repeat every measurement, to see the spread")
    p.add_argument("--threads", type=int, default=None, help="waitress threads of our server (default: its own)")
    p.add_argument("--bare-threads", type=int, default=8)
    p.add_argument("--batch-delay-ms", type=float, default=5.0)
    p.add_argument("--runtime", type=json.loads, default={}, help="extra [inference] settings for 'ours' (JSON)")
    p.add_argument("--skip", default="", help="comma list of targets to skip (torchserve)")
    p.add_argument("--batching-model", default="mlp_xl", choices=list(models.MODELS))
    p.add_argument("--batching-threads", type=int, default=48,
                   help="waitress threads of both batching servers: a request holds its thread while it waits "
                        "in the queue, so a batch can never hold more requests than there are threads")
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
            procs, tgts, name = start_case(case, work, args)
            try:
                module = models.load(name, work / "weights" / f"{name}.safetensors")
                inputs = rng.standard_normal((64, models.MODELS[name][0])).astype(np.float32)
                with torch.inference_mode():
                    expected = module(torch.from_numpy(inputs)).numpy()
                total, step = args.rounds * len(concs) * len(tgts), 0
                for rnd in range(args.rounds):
                    for c in concs:
                        for t, proc in zip(tgts, procs):
                            for other in procs:  # only the target under load runs
                                other.pause(other is not proc)
                            time.sleep(0.2)
                            cpu0 = targets.session_cpu_s(proc.process.pid)
                            res = run_load(t, inputs, expected, c, args.requests, args.seconds, warmup=3,
                                           atol=1e-3 * float(np.abs(expected).max()), rtol=1e-3)
                            cpu = targets.session_cpu_s(proc.process.pid) - cpu0
                            row = {"case": case, "model": name, "round": rnd, **res.to_dict(),
                                   "server_cpu_ms_per_request": 1000 * cpu / max(1, res.requests)}
                            runs.append(row)
                            step += 1
                            bar = "#" * (20 * step // total)
                            progress(f"[{bar:<20}] {step}/{total} {case} round {rnd} c={c:<3} {t.name:<13} "
                                     f"{res.requests_per_s:8.1f} req/s "
                                     f"p50 {res.p50_ms:7.2f} ms p99 {res.p99_ms:7.2f} ms "
                                     f"cpu {row['server_cpu_ms_per_request']:.2f} ms/req errors {res.errors}"
                                     + (f" ({res.first_error})" if res.first_error else ""))
            finally:
                for proc in procs:
                    proc.pause(False)
                    proc.stop()
    goals = summarise(runs)
    print(table(runs, goals))
    result = {"suite": "serving-load", "date": datetime.datetime.now(datetime.timezone.utc).isoformat(
        timespec="seconds").replace("+00:00", "Z"), "machine": machine_info(args.machine),
        "settings": {k: (sorted(v) if isinstance(v, set) else v) for k, v in vars(args).items() if k != "out"},
        "runs": runs, "goals": goals}
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
        progress(f"wrote {args.out}")
    return 0 if all(r["errors"] == 0 for r in runs) else 1


if __name__ == "__main__":
    sys.exit(main())
