"""Triton kernels of the fast path (layout gathers, the flat weight cast), of the decode step (the routed
projection of one token per row) and their low-overhead launcher.

Every kernel has a PyTorch twin used off CUDA. May import ``mom.ops`` and ``mom.utils`` only.
"""
