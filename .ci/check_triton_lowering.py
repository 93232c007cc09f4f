"""Lower every Triton kernel ahead of time for sm_80 and sm_90, no GPU needed.

The interpreter runs kernels as numpy and cannot see layout, type or
constexpr errors that only the real compiler hits; this does. Each kernel
module lists its kernels in AOT_SPECS, each with the warps and stages its autotuned config
runs with. Run without TRITON_INTERPRET.

Each kernel is lowered twice: "aligned" with the hints the runtime passes for a typical
launch (tt.divisibility 16 on every pointer and integer argument: 16-byte aligned
tensors, sizes and strides that are multiples of 16), which is the code a GPU runs and
whose registers and spills matter, and "unaligned" with none (odd sizes, offset views).
"""
import importlib
import os
import pkgutil
import re
import subprocess
import sys
import tempfile
import time

if os.environ.get("TRITON_INTERPRET") == "1":
    sys.exit("check_triton_lowering: unset TRITON_INTERPRET (the interpreter skips compilation)")

from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource, compile  # noqa: E402

import msmartcompute.ops.triton as pkg  # noqa: E402

TARGETS = [GPUTarget("cuda", 80, 32), GPUTarget("cuda", 90, 32)]
VARIANTS = ("aligned", "unaligned")


def runtime_hints(kernel, signature: dict, variant: str) -> dict:
    """The attrs the launcher would pass: {(arg index,): [["tt.divisibility", 16]]}."""
    if variant == "unaligned":
        return {}
    return {(kernel.arg_names.index(name),): [["tt.divisibility", 16]]
            for name, ty in signature.items() if ty.startswith("*") or ty in ("i32", "i64")}


def lower(kernel, signature: dict, constexprs: dict, target, variant: str, options: dict | None = None):
    full_signature = dict(signature, **{name: "constexpr" for name in constexprs})
    source = ASTSource(kernel, full_signature, constexprs, attrs=runtime_hints(kernel, signature, variant))
    compiled = compile(source, target=target, options=options)
    assert f".target sm_{target.arch}" in compiled.asm["ptx"], f"PTX does not target sm_{target.arch}"
    return compiled


def resources(compiled) -> str:
    """Registers and stack (spills land there) of the cubin, from the cuobjdump Triton ships."""
    import triton

    cuobjdump = os.path.join(os.path.dirname(triton.__file__), "backends/nvidia/bin/cuobjdump")
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(compiled.asm["cubin"])
        f.flush()
        out = subprocess.run([cuobjdump, "-res-usage", f.name], capture_output=True, text=True).stdout
    found = re.search(r"REG:(\d+) STACK:(\d+)", out)
    return f"{found[1]} registers, stack {found[2]} B" if found else "resources unknown"


def main() -> int:
    failures, lowered = [], 0
    for info in pkgutil.iter_modules(pkg.__path__):
        module = importlib.import_module(f"{pkg.__name__}.{info.name}")
        # (kernel, signature, constexprs[, options such as num_warps, as the autotuned config runs])
        for kernel, signature, constexprs, *options in getattr(module, "AOT_SPECS", []):
            for target in TARGETS:
                for variant in VARIANTS:
                    name = (f"{info.name}.{kernel.fn.__name__}[{','.join(signature.values())}] "
                            f"sm_{target.arch} {variant}")
                    start = time.monotonic()
                    try:
                        compiled = lower(kernel, signature, constexprs, target, variant, *options)
                        lowered += 1
                        print(f"ok   {name} ({time.monotonic() - start:.2f}s, {resources(compiled)})")
                    except Exception as exc:  # report every kernel, then fail
                        failures.append(name)
                        print(f"FAIL {name}: {type(exc).__name__}: {exc}")
    print(f"{lowered} passed, {len(failures)} failed")
    return 1 if failures or lowered == 0 else 0


if __name__ == "__main__":
    sys.exit(main())
