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

for failure in failures:
    print("FAIL", failure)
print(f"{len(kernels) - sum('kernel ' in f for f in failures)} passed, {len(failures)} failed")
sys.exit(1 if failures or not kernels else 0)
