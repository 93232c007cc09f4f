"""Check that the built _C holds sm_90 (and sm_80) device code for every CUDA kernel.

Every `__global__` function in kernels/*.cu must appear in the sm_90 SASS of
the extension; compiled on a machine with no GPU, so this is what proves the
kernels were really built for Hopper. The tensor-core kernels must hold their
mma / ldmatrix / cp.async instructions on sm_80 and sm_90, and the attention
kernels must use no local memory (no register spills). Uses the cuobjdump that the triton
package ships (the toolkit here has none).
"""
import glob
import os
import re
import shutil
import subprocess
import sys

import msmartcompute
import triton

root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
so = glob.glob(os.path.join(os.path.dirname(msmartcompute.__file__), "_C*.so"))
if not so:
    sys.exit("no built msmartcompute._C found")
cuobjdump = shutil.which("cuobjdump") or os.path.join(os.path.dirname(triton.__file__), "backends/nvidia/bin/cuobjdump")

elves = subprocess.run([cuobjdump, "--list-elf", so[0]], capture_output=True, text=True, check=True).stdout
print(elves.strip())
failures = []
for arch in ("sm_80", "sm_90"):
    if f".{arch}.cubin" not in elves:
        failures.append(f"no {arch} cubin in {so[0]}")

sass = subprocess.run([cuobjdump, "-sass", "-arch", "sm_90", so[0]], capture_output=True, text=True,
                      check=True).stdout
functions = re.findall(r"Function : (\S+)", sass)
kernels = set()
for path in glob.glob(os.path.join(root, "kernels", "*.cu")):
    kernels.update(re.findall(r"__global__\s+(?:__launch_bounds__\([^)]*\)\s+)?void\s+(\w+)", open(path).read()))
for kernel in sorted(kernels):
    found = [f for f in functions if f"{len(kernel)}{kernel}" in f]  # mangled: <length><name>
    print(f"{'ok  ' if found else 'FAIL'} {kernel}: {len(found)} sm_90 instantiation(s)")
    if not found:
        failures.append(f"kernel {kernel} has no sm_90 code")

# Tensor-core kernels must really use the tensor cores: every sm_80 and sm_90 instantiation of
# these holds each named SASS instruction (mma.sync s8 -> IMMA, f16/bf16 -> HMMA, ldmatrix ->
# LDSM, ldmatrix.trans -> LDSM.16.MT88, cp.async -> LDGSTS).
ATTENTION_SASS = ("HMMA.16816.F32", "LDSM.16.M88.4", "LDSM.16.MT88.4", "LDGSTS")
TENSOR_CORE_SASS = {"int8_gemm_kernel": ("IMMA.",), "mixed_gemm_kernel": ("HMMA.",),
                    "attention_fwd_kernel": ATTENTION_SASS, "attention_bwd_dkdv_kernel": ATTENTION_SASS,
                    "attention_bwd_dq_kernel": ATTENTION_SASS}
# Kernels that must keep everything in registers and shared memory: no local memory (spills,
# stack arrays) in any instantiation, read from the cubins' resource usage.
NO_LOCAL_MEMORY = ("attention_fwd_kernel", "attention_combine_kernel", "attention_bwd_delta_kernel",
                   "attention_bwd_dkdv_kernel", "attention_bwd_dq_kernel")
# Head dims every attention kernel is built for (mangled template argument Li<D>E), per dtype.
HEAD_DIMS = {"attention_fwd_kernel": (32, 64, 128, 256), "attention_bwd_dkdv_kernel": (32, 64, 128, 256),
             "attention_bwd_dq_kernel": (32, 64, 128, 256)}
checks = 0
for arch in ("sm_80", "sm_90"):
    arch_sass = sass if arch == "sm_90" else subprocess.run(
        [cuobjdump, "-sass", "-arch", arch, so[0]], capture_output=True, text=True, check=True).stdout
    bodies = re.split(r"\n\s*Function : ", arch_sass)[1:]
    for kernel, instructions in TENSOR_CORE_SASS.items():
        if kernel not in kernels:
            continue
        found = [b for b in bodies if f"{len(kernel)}{kernel}" in b.split("\n", 1)[0]]
        for instruction in instructions:
            checks += 1
            missing = [b.split("\n", 1)[0] for b in found if instruction not in b]
            print(f"{'FAIL' if missing or not found else 'ok  '} {kernel}: {instruction.rstrip('.')} in "
                  f"{len(found) - len(missing)}/{len(found)} {arch} instantiation(s)")
            if missing or not found:
                failures.append(f"kernel {kernel}: no {instruction.rstrip('.')} in {len(missing) or 'any'} "
                                f"{arch} instantiation(s)")
    for kernel, dims in HEAD_DIMS.items():
        heads = [b.split("\n", 1)[0] for b in bodies if f"{len(kernel)}{kernel}" in b.split("\n", 1)[0]]
        for dim in dims:
            checks += 1
            n = sum(f"Li{dim}E" in h for h in heads)
            print(f"{'ok  ' if n >= 2 else 'FAIL'} {kernel}: head dim {dim} in {n} {arch} instantiation(s)")
            if n < 2:  # float16 and bfloat16
                failures.append(f"kernel {kernel}: head dim {dim} not built for both dtypes on {arch}")
    usage = subprocess.run([cuobjdump, "-res-usage", "-arch", arch, so[0]], capture_output=True, text=True,
                           check=True).stdout
    pairs = re.findall(r"Function (\S+):\s*\n\s*REG:(\d+) STACK:(\d+) SHARED:\d+ LOCAL:(\d+)", usage)
    for kernel in NO_LOCAL_MEMORY:
        if kernel not in kernels:
            continue
        checks += 1
        found = [(name, int(reg), int(stack), int(local)) for name, reg, stack, local in pairs
                 if f"{len(kernel)}{kernel}" in name]
        spilling = [f for f in found if f[2] or f[3]]
        print(f"{'FAIL' if spilling or not found else 'ok  '} {kernel}: no local memory in "
              f"{len(found) - len(spilling)}/{len(found)} {arch} instantiation(s), registers "
              f"{min((f[1] for f in found), default=0)}-{max((f[1] for f in found), default=0)}")
        if spilling or not found:
            failures.append(f"kernel {kernel}: local memory (stack/spills) in {len(spilling) or 'no found'} "
                            f"{arch} instantiation(s)")

for failure in failures:
    print("FAIL", failure)
print(f"{len(kernels) + checks - len(failures)} passed, {len(failures)} failed")
sys.exit(1 if failures or not kernels else 0)
