"""What every load benchmark (benchmarks/serving, benchmarks/generation) does the same way:
the machine it ran on, the servers under test (started once, only the one under load running,
all stopped at the end), the goals as ratios between neighbouring measurements (per round, then
the median), and the result file.

A ratio is always taken between measurements of the same round, which ran one right after the
other: on a shared, noisy machine only such ratios compare like with like.
"""
from __future__ import annotations

import datetime
import json
import operator
import os
import platform
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch


def progress(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def machine_info(label: str) -> dict:
    cpu = platform.processor()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    load = os.getloadavg() if hasattr(os, "getloadavg") else None
    return {"label": label, "cpu": cpu, "cores": os.cpu_count(), "arch": platform.machine(),
            "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
            "python": platform.python_version(), "torch": torch.__version__,
            "cuda": torch.version.cuda if torch.cuda.is_available() else None,
            "load_average_at_start": [round(x, 2) for x in load] if load else None}


class Servers:
    """The servers of one run, by name. `only(name)` resumes that one and freezes (SIGSTOP) the
    others while it is measured, so an idle server's background work (a JVM's above all) takes no
    CPU from it. Leaving the `with` block stops them all, whatever happened."""

    def __init__(self):
        self.procs: dict[str, object] = {}   # name -> a process with pause(bool) and stop()

    def __enter__(self) -> "Servers":
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def add(self, name: str, proc) -> None:
        self.procs[name] = proc

    def only(self, name: str) -> None:
        for other, proc in self.procs.items():
            proc.pause(other != name)
        time.sleep(0.2)  # the resumed one settles (its threads were frozen mid-wait)

    def stop(self) -> None:
        for proc in self.procs.values():
            proc.pause(False)
            proc.stop()
        self.procs.clear()


_OPS = {">=": operator.ge, "<=": operator.le}


@dataclass
class Goal:
    """`metric` of target `ours` over target `baseline`, median over rounds, `op` `value`; `where`
    picks the rows compared (e.g. {"case": "overhead", "concurrency": 8}), `baseline_where`
    overrides it for the baseline's row (ours at c=32 over ours at c=8)."""
    metric: str
    ours: str
    baseline: str
    op: str
    value: float
    where: dict = field(default_factory=dict)
    baseline_where: dict = field(default_factory=dict)

    def judge(self, rows: list[dict]) -> dict:
        def per_round(target: str, where: dict) -> dict:
            return {r["round"]: r[self.metric] for r in rows
                    if r["target"] == target and all(r.get(k) == v for k, v in where.items())}

        ours = per_round(self.ours, self.where)
        base = per_round(self.baseline, {**self.where, **self.baseline_where})
        ratios = [ours[k] / base[k] for k in sorted(ours) if k in base and base[k]]
        out = {**self.where, **{f"baseline_{k}": v for k, v in self.baseline_where.items()},
               "metric": self.metric, "ours": self.ours, "baseline": self.baseline,
               "goal": f"{self.op} {self.value}", "ratios": ratios, "median": None, "min": None, "max": None,
               "met": False}
        if ratios:
            median = statistics.median(ratios)
            out.update(median=median, min=min(ratios), max=max(ratios), met=_OPS[self.op](median, self.value))
        return out

    @staticmethod
    def line(judged: dict) -> str:
        where = " ".join(f"{k}={judged[k]}" for k in judged if k not in
                         ("metric", "ours", "baseline", "goal", "ratios", "median", "min", "max", "met"))
        if judged["median"] is None:
            return f"{judged['ours']} / {judged['baseline']} {where} {judged['metric']}: not measured"
        return (f"{judged['ours']} / {judged['baseline']} {where} {judged['metric']}: {judged['median']:.2f}x "
                f"(rounds {', '.join(f'{x:.2f}' for x in judged['ratios'])}; goal {judged['goal']}) "
                f"{'MET' if judged['met'] else 'NOT MET'}")


def judge(goals: list[Goal], rows: list[dict]) -> list[dict]:
    judged = [g.judge(rows) for g in goals]
    for j in judged:
        progress(Goal.line(j))
    return judged


def write_result(path: str | None, suite: str, machine: str, settings: dict, runs: list[dict], goals: list[dict],
                 **extra) -> dict:
    """The result document (and its file when `path` is given)."""
    result = {"suite": suite, "date": datetime.datetime.now(datetime.timezone.utc).isoformat(
        timespec="seconds").replace("+00:00", "Z"), "machine": machine_info(machine),
        "settings": {k: (sorted(v) if isinstance(v, set) else v) for k, v in settings.items() if k != "out"},
        **extra, "runs": runs, "goals": goals}
    if path:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(json.dumps(result, indent=1) + "\n")
        progress(f"wrote {path}")
    return result
