"""The generation load benchmark: continuous batching (ours) vs the static batching it replaced
vs Hugging Face transformers' generate, on the same requests, side by side in one run.

Workload (fixed seed): 64 requests at concurrency 32, prompt lengths 16-256, max_tokens 8-128,
temperature 0 and 0.8 alternating, on a tiny Llama-architecture decoder loaded as a real Hugging
Face checkpoint: transformers' LlamaForCausalLM (RMSNorm, rotary, SwiGLU, grouped-query
attention) saved with save_pretrained (config.json + model.safetensors), which every server
loads from its model root through models/llama.py, and the hf target from the same folder.

Targets, measured one after the other, round by round:
- ours: `msmartcompute serve` from this tree, whole responses like the other two (tokens/s);
- ours_stream: the same server, every request with options.stream (time to first token = the
  first SSE event; 32 streams cost the server a thread wake-up and a write per token each);
- static: `msmartcompute serve` from the tree of main before pretrained decoders ran on the
  generation engine (`--baseline-rev`, unpacked with git archive): a request is batched only
  with requests of the same (temperature, top_p, max_tokens), run to the end over a dense KV
  cache; it streams nothing, so its first token arrives with the response;
- hf: transformers' LlamaForCausalLM from the same folder, in this process: the requests in
  batches of 32 in arrival order, each batch split by temperature and left-padded,
  `generate(max_new_tokens = the group's largest)`; a request's time to first token is its
  group's end (generate returns the whole batch at once).
Generated tokens/s counts the tokens each request asked for (max_tokens; no EOS in these
models), over the wall time from the first request sent to the last answer. Greedy answers of
ours are compared token for token with static's and hf's (a mismatch is reported, not hidden).
Every target is warmed with one whole pass first (the kernel backends measure at each new shape).

Run: python -m benchmarks.generation.run --rounds 2 --out benchmarks/results/generation-cpu-2core.json
"""
from __future__ import annotations

import argparse
import http.client
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import orjson
import torch

from benchmarks.harness import Goal, Servers, judge, progress, write_result
from benchmarks.serving import targets

BASELINE_REV = "17d0d33"  # main before pretrained decoders ran on the generation engine: static batching
PARAMS = {"vocab_size": 512, "hidden_size": 64, "num_layers": 2, "num_heads": 4, "num_kv_heads": 2,
          "intermediate_size": 170}
CHECKPOINT = "llama-tiny"   # the folder under each server's model root
SEED = 11
SPEC = {"model_id": "llama-tiny", "model_type": "transformer", "model_path": CHECKPOINT, "max_sequence_length": 512,
        "max_batch_size": 32}
GOALS = [Goal("tokens_per_s", "ours", "static", ">=", 3.0), Goal("tokens_per_s", "ours", "hf", ">=", 2.0),
         Goal("ttft_p99_s", "ours_stream", "static", "<=", 0.5)]


def workload(n: int = 64, seed: int = 0) -> list[dict]:
    rng = np.random.default_rng(seed)
    return [{"prompt": rng.integers(0, PARAMS["vocab_size"], int(rng.integers(16, 257))).tolist(),
             "max_tokens": int(rng.integers(8, 129)), "temperature": 0.0 if i % 2 == 0 else 0.8, "seed": i}
            for i in range(n)]


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q * (len(ordered) - 1))))]


def summary(name: str, wall_s: float, tokens: int, ttft: list[float], latency: list[float], errors: int) -> dict:
    return {"target": name, "wall_s": wall_s, "tokens": tokens, "tokens_per_s": tokens / wall_s,
            "ttft_p50_s": _percentile(ttft, 0.5), "ttft_p99_s": _percentile(ttft, 0.99),
            "latency_p50_s": _percentile(latency, 0.5), "latency_p99_s": _percentile(latency, 0.99),
            "errors": errors}


def load_http(name: str, port: int, requests: list[dict], concurrency: int, stream: bool) -> tuple[dict, list]:
    """Closed loop: `concurrency` threads, one keep-alive connection each, take the next request."""
    ttft, latency, outputs, errors = [], [], [None] * len(requests), []
    lock, cursor = threading.Lock(), iter(range(len(requests)))

    def worker():
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=600)
        headers = {"Content-Type": "application/json", "Authorization": f"Bearer {targets.BENCH_KEY}"}
        while True:
            with lock:
                i = next(cursor, None)
            if i is None:
                break
            r = requests[i]
            body = orjson.dumps({"model_id": SPEC["model_id"], "input_data": [r["prompt"]], "options": {
                "max_tokens": r["max_tokens"], "temperature": r["temperature"], "seed": r["seed"],
                "timeout": 600, **({"stream": True} if stream else {})}})
            t0 = time.perf_counter()
            try:
                conn.request("POST", "/api/v1/inference", body=body, headers=headers)
                resp = conn.getresponse()
                first, final = None, None
                if stream:
                    event = None
                    for line in resp:  # SSE lines as they come
                        if first is None and line.startswith(b"data: "):
                            first = time.perf_counter()
                        if line.startswith(b"event: "):
                            event = line[7:].strip()
                        elif line.startswith(b"data: ") and event in (b"done", b"error"):
                            final = orjson.loads(line[6:])
                            break
                    resp.read()
                else:
                    final = orjson.loads(resp.read())
                    first = time.perf_counter()
                end = time.perf_counter()
                if resp.status != 200 or not final or not final.get("success"):
                    raise RuntimeError(f"HTTP {resp.status}: {str(final)[:200]}")
                with lock:
                    ttft.append(first - t0)
                    latency.append(end - t0)
                    outputs[i] = final["output_data"][0]
            except Exception as exc:  # noqa: BLE001 - counted and reported
                with lock:
                    errors.append(f"{type(exc).__name__}: {exc}")
                conn.close()
                conn = http.client.HTTPConnection("127.0.0.1", port, timeout=600)
        conn.close()

    t0 = time.perf_counter()
    threads = [threading.Thread(target=worker) for _ in range(concurrency)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    tokens = sum(len(o) for o in outputs if o is not None)
    res = summary(name, wall, tokens, ttft, latency, len(errors))
    if errors:
        res["first_error"] = errors[0]
    return res, outputs


def make_checkpoint(folder: Path) -> Path:
    """The tiny Llama checkpoint as transformers writes it (weights from SEED, no EOS: every
    request generates its max_tokens)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=PARAMS["vocab_size"], hidden_size=PARAMS["hidden_size"],
                      num_hidden_layers=PARAMS["num_layers"], num_attention_heads=PARAMS["num_heads"],
                      num_key_value_heads=PARAMS["num_kv_heads"], intermediate_size=PARAMS["intermediate_size"],
                      max_position_embeddings=SPEC["max_sequence_length"], pad_token_id=0,
                      bos_token_id=None, eos_token_id=None, tie_word_embeddings=False)
    torch.manual_seed(SEED)
    LlamaForCausalLM(cfg).save_pretrained(folder)
    return folder


def hf_model(folder: Path):
    from transformers import LlamaForCausalLM

    return LlamaForCausalLM.from_pretrained(folder, torch_dtype=torch.float32).eval()


def with_checkpoint(state_dir: Path, checkpoint: Path) -> Path:
    """A server's state dir holding the checkpoint under its model root (<state>/models)."""
    shutil.copytree(checkpoint, state_dir / "models" / CHECKPOINT)
    return state_dir


@torch.inference_mode()
def load_hf(model, requests: list[dict], concurrency: int) -> tuple[dict, list]:
    ttft, latency, tokens, outputs = [], [], 0, [None] * len(requests)
    t0 = time.perf_counter()
    for lo in range(0, len(requests), concurrency):
        batch = requests[lo:lo + concurrency]
        started = time.perf_counter()
        for temperature in sorted({r["temperature"] for r in batch}):
            group = [r for r in batch if r["temperature"] == temperature]
            width = max(len(r["prompt"]) for r in group)
            ids = torch.tensor([[0] * (width - len(r["prompt"])) + r["prompt"] for r in group])
            mask = torch.tensor([[0] * (width - len(r["prompt"])) + [1] * len(r["prompt"]) for r in group])
            new = max(r["max_tokens"] for r in group)
            torch.manual_seed(group[0]["seed"])
            out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=new, min_new_tokens=new,
                                 do_sample=temperature > 0, **({"temperature": temperature, "top_p": 1.0, "top_k": 0}
                                                                if temperature > 0 else {}),
                                 pad_token_id=0)
            assert out.shape[1] == width + new
            done = time.perf_counter()
            for row, r in enumerate(group):  # a request gets its own max_tokens of the padded batch's output
                tokens += r["max_tokens"]
                ttft.append(done - started)
                latency.append(done - started)
                outputs[requests.index(r)] = out[row, width:width + r["max_tokens"]].tolist()
    return summary("hf", time.perf_counter() - t0, tokens, ttft, latency, 0), outputs


def baseline_checkout(rev: str, where: Path) -> Path:
    """The tree of `rev` (git archive, so no worktree is registered) with its extension built
    (CPU only), reused if present."""
    if not (where / "msmartcompute").exists():
        where.mkdir(parents=True, exist_ok=True)
        archive = subprocess.run(["git", "-C", str(targets.REPO), "archive", rev], check=True, capture_output=True)
        subprocess.run(["tar", "-x", "-C", str(where)], input=archive.stdout, check=True)
    if not list((where / "msmartcompute").glob("_C*.so")):
        progress(f"building the extension of {rev} (CPU only) ...")
        subprocess.run([sys.executable, "setup.py", "-q", "build_ext", "--inplace"], cwd=where, check=True,
                       capture_output=True, env={**targets._env(where), "MSC_BUILD_CUDA": "0"})
    return where


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--machine", default="2-core x86_64 CPU dev box, no GPU", help="machine label stored in the result")
    p.add_argument("--out", help="result JSON path")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--requests", type=int, default=64)
    p.add_argument("--concurrency", type=int, default=32)
    p.add_argument("--targets", default="ours,ours_stream,static,hf")
    p.add_argument("--torch-threads", type=int, default=1,
                   help="OMP_NUM_THREADS of every server and torch threads of the hf target (the same for all)")
    p.add_argument("--baseline-rev", default=BASELINE_REV)
    p.add_argument("--baseline-dir", default=str(Path(tempfile.gettempdir()) / f"msc-generation-baseline-{BASELINE_REV}"))
    args = p.parse_args(argv)
    names = args.targets.split(",")
    os.environ["OMP_NUM_THREADS"] = str(args.torch_threads)  # inherited by the servers started below
    torch.set_num_threads(args.torch_threads)
    requests = workload(args.requests)
    rows, outputs = [], {}
    with tempfile.TemporaryDirectory(prefix="msc-gen-") as tmp, Servers() as servers:
        checkpoint = make_checkpoint(Path(tmp) / "checkpoint")
        ports = {}
        if "ours" in names or "ours_stream" in names:
            proc, target = targets.ours("ours", SPEC, with_checkpoint(Path(tmp) / "ours", checkpoint),
                                        {"max_queue_delay_ms": 5})
            servers.add("ours", proc)
            ports["ours"] = ports["ours_stream"] = target.port
        if "static" in names:
            repo = baseline_checkout(args.baseline_rev, Path(args.baseline_dir))
            proc, target = targets.ours("static", SPEC, with_checkpoint(Path(tmp) / "static", checkpoint),
                                        {"max_queue_delay_ms": 5}, repo=repo)
            servers.add("static", proc)
            ports["static"] = target.port
        model = hf_model(checkpoint) if "hf" in names else None

        # warm up every target with one whole pass (first-call allocations, lazy inits, the kernel
        # backends' first measurements at each new shape) before measuring
        for name in names:
            servers.only(name.removesuffix("_stream"))
            if name == "hf":
                load_hf(model, requests, args.concurrency)
            else:
                load_http(name, ports[name], requests, args.concurrency, stream=name == "ours_stream")
        for rnd in range(args.rounds):
            for name in names:
                servers.only(name.removesuffix("_stream"))  # hf: every server frozen
                if name == "hf":
                    row, outputs[name] = load_hf(model, requests, args.concurrency)
                else:
                    row, outputs[name] = load_http(name, ports[name], requests, args.concurrency,
                                                   stream=name == "ours_stream")
                row["round"] = rnd
                rows.append(row)
                progress(f"round {rnd} {name:<7} {row['tokens_per_s']:8.1f} tok/s  wall {row['wall_s']:6.2f} s  "
                         f"TTFT p50 {row['ttft_p50_s']:.3f} p99 {row['ttft_p99_s']:.3f} s  "
                         f"errors {row['errors']}" + (f" ({row['first_error']})" if row.get("first_error") else ""))
    greedy = [i for i, r in enumerate(requests) if r["temperature"] == 0]
    agreement = None
    if "ours" in outputs and "static" in outputs:
        agreement = sum(outputs["ours"][i] == outputs["static"][i] for i in greedy)
        progress(f"greedy answers equal (ours vs static): {agreement}/{len(greedy)}")
    agreement_hf = None
    if "ours" in outputs and "hf" in outputs:
        agreement_hf = sum(outputs["ours"][i] == outputs["hf"][i] for i in greedy)
        progress(f"greedy answers equal (ours vs transformers' generate): {agreement_hf}/{len(greedy)}")
    seeded = None
    if "ours" in outputs and "ours_stream" in outputs:  # sampled ones too: a request's tokens depend on its seed only
        seeded = sum(outputs["ours"][i] == outputs["ours_stream"][i] for i in range(len(requests)))
        progress(f"answers equal (ours vs ours_stream, other batch mates): {seeded}/{len(requests)}")
    goals = judge(GOALS, rows)
    write_result(args.out, "generation-load", args.machine,
                 {**vars(args), "spec": SPEC, "checkpoint": {"architecture": "LlamaForCausalLM", **PARAMS, "seed": SEED,
                                                             "format": "safetensors"}},
                 rows, goals, greedy_equal_ours_static=agreement, greedy_equal_ours_hf=agreement_hf,
                 greedy_requests=len(greedy),
                 all_equal_ours_ours_stream=seeded)
    return 0 if all(r["errors"] == 0 for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
