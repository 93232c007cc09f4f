"""The GPU scripts' JSON output, rewritten after every measured row: run_all.sh stops a script
at its time limit, and what it measured until then must survive (the device keeps nothing)."""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time

import torch


def write_json(path: str | None, report: dict) -> None:
    """Replace `path` atomically (a kill mid-write leaves the previous version, not half a file)."""
    if not path:
        return
    tmp = f"{path}.partial"
    with open(tmp, "w") as f:
        json.dump(report, f, indent=1)
    os.replace(tmp, path)


def parser(doc: str, warmup: int, reps: int) -> argparse.ArgumentParser:
    """The options every kernel script takes (--out, --warmup, --reps, --list); a script adds its own."""
    p = argparse.ArgumentParser(description=doc.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", help="write the results as JSON to this path")
    p.add_argument("--warmup", type=int, default=warmup)
    p.add_argument("--reps", type=int, default=reps)
    p.add_argument("--list", action="store_true", help="print the cases and exit")
    return p


def listed_or_no_gpu(args, cases: list[dict], impls, script: str, describe=lambda case: case) -> int | None:
    """With --list: print the cases, exit status 0. Without a CUDA device: say so, status 2.
    Else None: the script measures."""
    if args.list:
        for case in cases:
            print(json.dumps(describe(case)))
        print(f"{len(cases)} cases x {len(impls)} implementations")
        return 0
    if not torch.cuda.is_available():
        print(f"{script}: needs a CUDA device (use --list to see the cases)", file=sys.stderr)
        return 2
    return None


def new_report(args, **extra) -> dict:
    """A results document: the card, versions and time, `extra`, the arguments, and the rows
    (`results`) that `add_row` appends."""
    report = {
        "card": torch.cuda.get_device_name(),
        "capability": ".".join(map(str, torch.cuda.get_device_capability())),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "python": platform.python_version(),
        "when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        **extra,
        "args": vars(args),
        "results": [],
    }
    try:
        import triton

        report["triton"] = triton.__version__
    except ImportError:
        pass
    return report


def add_row(report: dict, row: dict, out: str | None, line: str) -> None:
    """Appends a measured row, rewrites the JSON and prints the row's line."""
    report["results"].append(row)
    write_json(out, report)
    print(line, flush=True)


def skipped(exc: Exception) -> str:
    """Why a row was not measured (an SDPA backend refusing a shape, out of memory, ...)."""
    return f"{type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else ''}"
