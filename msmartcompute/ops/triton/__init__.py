"""Triton kernels, one module per op family.

Each module lists its kernels in ``AOT_SPECS`` (kernel, signature, constexprs[, options]) so
that CI can lower every kernel for sm_80 and sm_90 ahead of time with no GPU
(``.ci/check_triton_lowering.py``), catching errors the interpreter cannot see.
"""
