"""Lower every Triton kernel ahead of time for sm_80 and sm_90, no GPU needed.

The interpreter runs kernels as numpy and cannot see layout, type or
constexpr errors that only the real compiler hits; this does. Each kernel
module lists its kernels in AOT_SPECS. Run without TRITON_INTERPRET.
"""
import importlib
import os
import pkgutil
import sys
import time

if os.environ.get("TRITON_INTERPRET") == "1":
    sys.exit("check_triton_lowering: unset TRITON_INTERPRET (the interpreter skips compilation)")

from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource, compile  # noqa: E402

import msmartcompute.ops.triton as pkg  # noqa: E402

TARGETS = [GPUTarget("cuda", 80, 32), GPUTarget("cuda", 90, 32)]

failures, lowered = [], 0
for info in pkgutil.iter_modules(pkg.__path__):
    module = importlib.import_module(f"{pkg.__name__}.{info.name}")
    for kernel, signature, constexprs in getattr(module, "AOT_SPECS", []):
        full_signature = dict(signature, **{name: "constexpr" for name in constexprs})
        for target in TARGETS:
            name = f"{info.name}.{kernel.fn.__name__}[{','.join(signature.values())}] sm_{target.arch}"
            start = time.monotonic()
            try:
                compiled = compile(ASTSource(kernel, full_signature, constexprs), target=target)
                ptx = compiled.asm["ptx"]
                assert f".target sm_{target.arch}" in ptx, f"PTX does not target sm_{target.arch}"
                lowered += 1
                print(f"ok   {name} ({time.monotonic() - start:.2f}s)")
            except Exception as exc:  # report every kernel, then fail
                failures.append(name)
                print(f"FAIL {name}: {type(exc).__name__}: {exc}")

print(f"{lowered} passed, {len(failures)} failed")
sys.exit(1 if failures or lowered == 0 else 0)
