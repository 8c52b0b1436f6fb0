"""Triton kernels of the fast path (layout gathers, the flat weight cast, the grouped GEMM that gathers or scatters
its rows), of the decode step (the routed projection of one token per row, the fused state update) and their
low-overhead launcher.

Every kernel has a PyTorch twin used off CUDA. May import ``mom.ops`` and ``mom.utils`` only.
"""
