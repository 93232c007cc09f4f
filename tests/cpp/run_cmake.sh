#!/usr/bin/env bash
# Configure, build and ctest the CMake build against the venv's torch.
# PY: the venv's python (set by the Makefile). With a CUDA build of torch and
# nvcc present the CUDA sources are compiled too (MSC_WITH_CUDA=OFF to skip).
set -euo pipefail
cd "$(dirname "$0")/../.."
PY=${PY:-.venv/bin/python}
bin=$(cd "$(dirname "$PY")" && pwd)  # absolute: cmake runs tools from build-cmake/
PY=$bin/$(basename "$PY")
[ -x "$bin/cmake" ] || "$PY" -m pip install -q "cmake>=3.26"  # the system 3.25 cannot compile torch 2.14's headers
prefix=$("$PY" -c 'import torch.utils; print(torch.utils.cmake_prefix_path)')
torch_cuda=$("$PY" -c 'import torch; print(torch.version.cuda or "")')
args=(-S . -B build-cmake -G Ninja -DCMAKE_BUILD_TYPE=Release -DCMAKE_PREFIX_PATH="$prefix"
      -DCMAKE_MAKE_PROGRAM="$bin/ninja")
with_cuda=OFF
if [ -n "$torch_cuda" ]; then
  # A CUDA build of torch asks CMake for the toolkit even for CPU-only code.
  # The toolkit root: CUDA_HOME, else through nvcc (which may be a wrapper script that execs the real one).
  cuda_root=${CUDA_HOME:-}
  if [ -z "$cuda_root" ] && nvcc_path=$(command -v nvcc); then
    real=$(sed -n 's/^exec \(\S*\/bin\/nvcc\).*/\1/p' "$nvcc_path" 2>/dev/null | head -1)
    cuda_root=$(dirname "$(dirname "$(readlink -f "${real:-$nvcc_path}")")")
  fi
  [ -n "$cuda_root" ] || { echo "torch is a CUDA build but no CUDA toolkit was found (set CUDA_HOME)"; exit 1; }
  nvrtc=$(ls "$("$PY" -c 'import nvidia, os; print(os.path.dirname(nvidia.__path__[0]))')"/nvidia/cu*/lib/libnvrtc.so* 2>/dev/null | head -1 || true)
  args+=(-DCUDA_TOOLKIT_ROOT_DIR="$cuda_root" -DCUDAToolkit_ROOT="$cuda_root" -DCMAKE_CUDA_COMPILER="$cuda_root/bin/nvcc")
  [ -n "$nvrtc" ] && args+=(-DCUDA_nvrtc_LIBRARY="$nvrtc")
  with_cuda=${MSC_WITH_CUDA:-ON}
fi
args+=(-DMSC_WITH_CUDA="$with_cuda")
echo "cmake: torch CUDA ${torch_cuda:-none}, MSC_WITH_CUDA=$with_cuda"
"$bin/cmake" "${args[@]}"
"$bin/cmake" --build build-cmake -j "$(nproc)"
cd build-cmake && "$bin/ctest" --output-on-failure
