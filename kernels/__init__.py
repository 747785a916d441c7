"""Triton kernels, one file per op (kernel + launcher + autograd Function). Imported as grm_engine.kernels."""
