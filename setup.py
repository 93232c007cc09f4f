"""Builds msmartcompute._C.

CUDAExtension when torch is a CUDA build and nvcc is found (no GPU needed to
compile), CppExtension otherwise. MSC_BUILD_CUDA=0 forces CPU only;
TORCH_CUDA_ARCH_LIST defaults to "8.0;9.0". MSC_NO_EXTENSION=1 declares no
extension at all (the Makefile's editable install, so that the extension is
built once, incrementally, by `setup.py build_ext --inplace`).
"""
import glob
import os
import shutil
import sys

from setuptools import setup

ROOT = os.path.dirname(os.path.abspath(__file__))


def cuda_home():
    """The real toolkit root: the nvcc on PATH may be a wrapper script elsewhere."""
    if os.environ.get("CUDA_HOME"):
        return os.environ["CUDA_HOME"]
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        return None
    with open(nvcc, "rb") as f:
        head = f.read(512)
    if head.startswith(b"#!"):  # wrapper: find the nvcc it execs
        for token in head.decode(errors="ignore").split():
            if token.endswith("/bin/nvcc") and os.path.exists(token):
                nvcc = token
                break
    return os.path.dirname(os.path.dirname(os.path.realpath(nvcc)))


def build_with_cuda():
    if os.environ.get("MSC_BUILD_CUDA", "1") == "0":
        return False
    import torch

    return torch.version.cuda is not None and cuda_home() is not None


def extensions():
    if os.environ.get("MSC_NO_EXTENSION") == "1":
        return [], {}
    from torch.utils import cpp_extension

    sources = sorted(glob.glob("csrc/*.cpp") + glob.glob("csrc/cpu/*.cpp"))
    # -fopenmp: at::parallel_for is a header template whose `omp parallel` compiles only with it
    # (without, every CPU kernel ran on one thread); the .so then needs libgomp.so.1, the one torch
    # already loaded, so there is one thread pool.
    cxx_flags = ["-O3", "-std=c++20", "-DMSC_PYTHON_MODULE", "-fopenmp"]
    if build_with_cuda():
        os.environ["CUDA_HOME"] = cuda_home()
        cpp_extension.CUDA_HOME = os.environ["CUDA_HOME"]
        os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0")
        sources += sorted(glob.glob("csrc/cuda/*.cpp") + glob.glob("kernels/*.cu"))
        ext = cpp_extension.CUDAExtension(
            "msmartcompute._C",
            sources,
            extra_link_args=["-fopenmp"],
            extra_compile_args={
                "cxx": cxx_flags + ["-DMSC_WITH_CUDA"],
                "nvcc": ["-O3", "-std=c++20", "-lineinfo", "--expt-relaxed-constexpr"],
            },
        )
        print(f"msmartcompute: building with CUDA ({os.environ['CUDA_HOME']}, "
              f"arch {os.environ['TORCH_CUDA_ARCH_LIST']})", file=sys.stderr)
    else:
        ext = cpp_extension.CppExtension("msmartcompute._C", sources, extra_compile_args={"cxx": cxx_flags},
                                         extra_link_args=["-fopenmp"])
        print("msmartcompute: building CPU-only", file=sys.stderr)
    build_ext = cpp_extension.BuildExtension.with_options(use_ninja=True)
    return [ext], {"build_ext": build_ext}


ext_modules, cmdclass = extensions()
setup(ext_modules=ext_modules, cmdclass=cmdclass)
