"""Check that the built _C holds sm_90 (and sm_80) device code for every CUDA kernel.

Every `__global__` function in kernels/*.cu must appear in the sm_90 SASS of
the extension; compiled on a machine with no GPU, so this is what proves the
kernels were really built for Hopper. Uses the cuobjdump that the triton
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

# Tensor-core kernels must really use the tensor cores: every sm_90 instantiation of
# these holds the named SASS instruction (mma.sync s8 -> IMMA, f16/bf16 -> HMMA).
TENSOR_CORE_SASS = {"int8_gemm_kernel": "IMMA.", "mixed_gemm_kernel": "HMMA."}
bodies = re.split(r"\n\s*Function : ", sass)[1:]
for kernel, instruction in TENSOR_CORE_SASS.items():
    if kernel not in kernels:
        continue
    found = [b for b in bodies if f"{len(kernel)}{kernel}" in b.split("\n", 1)[0]]
    missing = [b.split("\n", 1)[0] for b in found if instruction not in b]
    print(f"{'FAIL' if missing or not found else 'ok  '} {kernel}: {instruction.rstrip('.')} in "
          f"{len(found) - len(missing)}/{len(found)} sm_90 instantiation(s)")
    if missing or not found:
        failures.append(f"kernel {kernel}: no {instruction.rstrip('.')} in {len(missing) or 'any'} instantiation(s)")

for failure in failures:
    print("FAIL", failure)
print(f"{len(kernels) + len(TENSOR_CORE_SASS) - len(failures)} passed, {len(failures)} failed")
sys.exit(1 if failures or not kernels else 0)
