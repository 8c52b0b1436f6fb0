"""Sequence-mixer operators: the pure-PyTorch reference scan and conv (`reference`), the dispatch to mamba-ssm /
causal-conv1d CUDA kernels (`backend`), the fused training Function of a routed mixer (`fused`), the conv and scan
it runs (`scan_ops`) and its Triton kernels (`ops.triton`), and the mixer's projections named once (`projections`).

Operators take tensors, never modules. May import ``mom.utils``; nothing of the model, training or command lines.
"""
