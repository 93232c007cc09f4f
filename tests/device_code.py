"""The sm_90 SASS of the built extension, for tests that prove what the CUDA kernels hold
without a GPU (the extension is compiled here; cuobjdump ships with Triton)."""
import glob
import os
import re
import subprocess


def sm90_functions(name_part: str) -> list[str]:
    """The SASS of every sm_90 function whose mangled name contains name_part, header line first."""
    import triton

    import msmartcompute

    so = glob.glob(os.path.join(os.path.dirname(msmartcompute.__file__), "_C*.so"))[0]
    cuobjdump = os.path.join(os.path.dirname(triton.__file__), "backends/nvidia/bin/cuobjdump")
    sass = subprocess.run([cuobjdump, "-sass", "-arch", "sm_90", so], capture_output=True, text=True,
                          check=True).stdout
    return [f for f in re.split(r"\n\s*Function : ", sass)[1:] if name_part in f.split("\n", 1)[0]]
