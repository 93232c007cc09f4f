"""Render the committed result files (benchmarks/results/*.json) into the results sections of
README.md and benchmarks/README.md, between the marker comments. Each file names its machine or card, date
and torch/CUDA versions; the renderer knows the load benchmark (serving-load), the served
transformer (gpu-serving), the generation load benchmark (generation-load), the GPU kernel scripts ({"card", "results": [...]}) and
pytest-benchmark JSON, and lists anything else by name.

    python benchmarks/render_results.py [--check]   # --check: exit 1 if README.md is stale
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
READMES = [HERE.parent / "README.md", HERE / "README.md"]  # the project's front page, then the details
BEGIN, END = "<!-- results:begin -->", "<!-- results:end -->"


def header(data: dict) -> tuple[str, str, str, str]:
    """(machine, date, torch, cuda) of any of our result formats."""
    m = data.get("machine") if isinstance(data.get("machine"), dict) else {}
    info = data.get("machine_info") or {}
    machine = (m.get("label") or data.get("card") or info.get("label") or
               (info.get("cpu") or {}).get("brand_raw") or info.get("processor") or "?")
    if m.get("cpu") and m.get("label") and m["cpu"] not in m["label"]:
        machine = f"{m['label']} ({m['cpu']})"
    date = data.get("date") or data.get("when") or data.get("datetime") or "?"
    torch_v = data.get("torch") or m.get("torch") or ((data.get("machine_info") or {}).get("torch")) or "?"
    cuda = data.get("cuda") or m.get("cuda") or info.get("cuda") or "none"
    return str(machine), str(date)[:19], str(torch_v), str(cuda)


def _median(xs):
    """The upper median (a value that was measured, never an average of two)."""
    return sorted(xs)[len(xs) // 2]


def fmt(v, digits=1) -> str:
    return "-" if v is None else f"{v:,.{digits}f}"


def sig(v: float) -> str:
    """Three significant figures at any scale, never a rounded-away 0.0."""
    if v == 0 or abs(v) >= 100:
        return f"{v:,.0f}"
    return f"{v:.3g}"


# A measurement whose spread (IQR, or the range of rounds) exceeds half its median says
# nothing beyond its order of magnitude: its rate and ratio are not shown.
NOISE = 0.5


def spread_pct(low: float, high: float, median: float) -> float:
    return (high - low) / median if median else float("inf")


def serving_load(data: dict) -> list[str]:
    out = ["| case | target | c | req/s (median of rounds) | req/s min-max | p50 ms | p99 ms | server CPU ms/req "
           "| CPU ms/req by process | machine idle | errors |", "|---|---|---:|---:|---:|---:|---:|---:|---|---:|---:|"]
    groups: dict[tuple, list[dict]] = {}
    for r in data["runs"]:
        groups.setdefault((r["case"], r["target"], r["concurrency"]), []).append(r)
    for (case, target, c), rs in groups.items():
        rates = [r['requests_per_s'] for r in rs]
        noisy = " (noise)" if spread_pct(min(rates), max(rates), _median(rates)) > NOISE else ""
        out.append(f"| {case} | {target} | {c} | {fmt(_median(rates))}{noisy} | {fmt(min(rates))}-{fmt(max(rates))} | "
                   f"{fmt(_median([r['p50_ms'] for r in rs]), 2)} | {fmt(_median([r['p99_ms'] for r in rs]), 2)} | "
                   f"{fmt(_median([r.get('server_cpu_ms_per_request', float('nan')) for r in rs]), 3)} | "
                   f"{_cpu_split(rs)} | {_idle(rs)} | {sum(r['errors'] for r in rs)} |")
    out += ["", "| goal | ratio (median) | rounds | target | met |", "|---|---:|---|---:|---|"]
    for g in data.get("goals", []):
        if g.get("median") is None:
            continue
        noisy = spread_pct(min(g["ratios"]), max(g["ratios"]), g["median"]) > NOISE
        met = "noise: rounds disagree" if noisy else ("yes" if g["met"] else "no")
        at = f"c={g['concurrency']}" + (f" over c={g['baseline_concurrency']}" if "baseline_concurrency" in g else "")
        out.append(f"| {g['ours']} / {g['baseline']} at {at}, {g['metric']} | {g['median']:.2f}x | "
                   f"{', '.join(f'{x:.2f}' for x in g['ratios'])} | {g['goal']} | {met} |")
    return out


def _idle(rows: list[dict]) -> str:
    """The median share of the machine's CPU time left idle during the rows (serving/run.py), or "-"."""
    idle = [r["machine_idle"] for r in rows if r.get("machine_idle") is not None]
    return f"{_median(idle):.0%}" if idle else "-"


def _cpu_split(rows: list[dict]) -> str:
    """The median per process role of the rows' CPU ms/request (serving/run.py), or "-"."""
    splits = [r["server_cpu_ms_per_request_by_process"] for r in rows if r.get("server_cpu_ms_per_request_by_process")]
    if not splits:
        return "-"
    roles = sorted({k for s in splits for k in s})
    by_role = {k: _median([s.get(k, 0.0) for s in splits]) for k in roles}
    return ", ".join(f"{k} {v:.3f}" for k, v in by_role.items() if v >= 0.0005)


def generation_load(data: dict) -> list[str]:
    out = ["| target | generated tokens/s (median of rounds) | TTFT p50 s | TTFT p99 s | latency p99 s | errors |",
           "|---|---:|---:|---:|---:|---:|"]
    for target in dict.fromkeys(r["target"] for r in data["runs"]):
        rs = [r for r in data["runs"] if r["target"] == target]
        out.append(f"| {target} | {fmt(_median([r['tokens_per_s'] for r in rs]))} | "
                   f"{fmt(_median([r['ttft_p50_s'] for r in rs]), 3)} | {fmt(_median([r['ttft_p99_s'] for r in rs]), 3)} | "
                   f"{fmt(_median([r['latency_p99_s'] for r in rs]), 3)} | {sum(r['errors'] for r in rs)} |")
    out += ["", "| goal | ratio (median) | rounds | target | met |", "|---|---:|---|---:|---|"]
    for g in data.get("goals", []):
        if g.get("median") is None:
            continue
        out.append(f"| {g['ours']} / {g['baseline']}, {g['metric']} | {g['median']:.2f}x | "
                   f"{', '.join(f'{x:.2f}' for x in g['ratios'])} | {g['goal']} | {'yes' if g['met'] else 'no'} |")
    return out


def gpu_serving(data: dict) -> list[str]:
    out = ["| weights | concurrent requests | tokens/s | vs bf16 |", "|---|---:|---:|---:|"]
    for r in data["rows"]:
        out.append(f"| {r['variant']} | {r['batch']} | {fmt(r['tokens_per_s'])} | "
                   f"{fmt(r.get('vs_bf16'), 2) + 'x' if r.get('vs_bf16') else '-'} |")
    return out


def kernel_rows(data: dict) -> list[str]:
    rows = data["results"]
    keys = [k for k in ("op", "impl", "name", "mode", "M", "K", "N", "batch", "seqlen", "head_dim", "causal")
            if any(k in r for r in rows)]
    rate = next((k for k in ("rate", "tflops", "tops", "gbps") if any(k in r for r in rows)), None)
    out = ["| " + " | ".join(keys + [rate or "value", "unit"]) + " |", "|" + "---|" * (len(keys) + 2)]
    for r in rows:
        value = r.get(rate) if rate else None
        unit = r.get("unit", "TFLOP/s" if rate == "tflops" else "")
        shown = fmt(value, 2) if isinstance(value, (int, float)) else (r.get("error") or r.get("skipped") or "-")
        out.append("| " + " | ".join(str(r.get(k, "")) for k in keys) + f" | {str(shown)[:60]} | {unit} |")
    return out


def pytest_benchmark(data: dict) -> list[str]:
    out = [f"Median of the rounds, its interquartile range (IQR, q1-q3) and the rounds; a row whose IQR "
           f"exceeds {NOISE:.0%} of its median is marked noise and its rate left out.", "",
           "| benchmark | median | IQR (q1-q3) | rounds | rate |", "|---|---:|---:|---:|---:|"]
    for b in data["benchmarks"]:
        st = b["stats"]
        info = b.get("extra_info") or {}
        noisy = spread_pct(st["q1"], st["q3"], st["median"]) > NOISE
        rate = "noise" if noisy else next((f"{sig(info[k])} {k}" for k in ("TFLOP/s", "GB/s", "tokens/s", "requests/s")
                                           if isinstance(info.get(k), (int, float))), "-")
        out.append(f"| {b['name']} | {sig(st['median'] * 1e6)} us | {sig(st['q1'] * 1e6)}-{sig(st['q3'] * 1e6)} us | "
                   f"{st['rounds']} | {rate} |")
    return out + side_by_side(data)


def side_by_side(data: dict) -> list[str]:
    """benchmarks/test_bench_auto.py: auto and each candidate timed interleaved in one run."""
    rows = [b["extra_info"] for b in data["benchmarks"] if "side_by_side_us" in (b.get("extra_info") or {})]
    if not rows:
        return []
    names = list(dict.fromkeys(name for r in rows for name in r["side_by_side_us"]))
    out = ["", "Interleaved in one run: each backend's fastest call in us (the estimate auto chooses by); "
           "auto / fastest candidate by fastest call and by median (goal <= 1.10); ours / torch below 1: "
           "our kernel wins. \"calls stalled\": a median over 1.5x the fastest call, most calls waited for a "
           "core taken by another process; the figures of that row are the machine's load, not the kernels.", "",
           "| op | shape | " + " | ".join(names) + " | auto chose | auto / fastest | (median) | ours / torch |",
           "|---|---|" + "---:|" * len(names) + "---|---:|---:|---:|"]
    for r in rows:
        t = r["side_by_side_us"]
        ours = min((t[n] for n in names if n not in ("auto", "torch") and n in t), default=None)
        ratio = f"{ours / t['torch']:.2f}" if ours and t.get("torch") else "-"
        # A median far above the fastest call: most calls waited for a core (another process's load).
        stalled = any(m > 1.5 * t[n] for n, m in (r.get("median_us") or {}).items() if n in t)
        out.append(f"| {r['op']} | {r['shape']}{' (calls stalled)' if stalled else ''} | " +
                   " | ".join(sig(t[n]) if n in t else "-" for n in names) +
                   f" | {r.get('chose') or '-'} | {r['auto_over_fastest']:.2f} | "
                   f"{r['auto_over_fastest_median']:.2f} | {ratio} |")
    return out


def render_file(path: Path) -> list[str]:
    data = json.loads(path.read_text())
    machine, date, torch_v, cuda = header(data)
    lines = [f"### {path.name}", "", f"Machine: **{machine}**; date {date}; torch {torch_v}; CUDA {cuda}.", ""]
    if data.get("suite") == "serving-load":
        lines += serving_load(data)
    elif data.get("suite") == "generation-load":
        lines += generation_load(data)
    elif data.get("suite") == "gpu-serving":
        lines += gpu_serving(data)
    elif isinstance(data.get("results"), list):
        lines += kernel_rows(data)
    elif isinstance(data.get("benchmarks"), list):
        lines += pytest_benchmark(data)
    else:
        lines.append("(format not recognised: see the file)")
    return lines + [""]


def render() -> str:
    files = sorted(RESULTS.glob("*.json"))
    body = [BEGIN, "", "_Generated by `python benchmarks/render_results.py` from benchmarks/results/*.json; "
            "do not edit by hand._", ""]
    if not files:
        body.append("No result files committed yet.")
    for path in files:
        body += render_file(path)
    return "\n".join(body + [END])


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--check", action="store_true", help="only check that the READMEs are up to date")
    args = p.parse_args(argv)
    rendered = render()
    stale = False
    for readme in READMES:
        text = readme.read_text() if readme.exists() else f"# Benchmarks\n\n## Results\n\n{BEGIN}\n{END}\n"
        if BEGIN not in text or END not in text:
            text = text.rstrip() + f"\n\n## Results\n\n{BEGIN}\n{END}\n"
        start, end = text.index(BEGIN), text.index(END) + len(END)
        new = text[:start] + rendered + text[end:]
        if args.check:
            if new != text:
                print(f"{readme} results are stale: run python benchmarks/render_results.py", file=sys.stderr)
                stale = True
            continue
        readme.write_text(new)
        print(f"rendered {len(list(RESULTS.glob('*.json')))} result file(s) into {readme}")
    return 1 if stale else 0


if __name__ == "__main__":
    sys.exit(main())
