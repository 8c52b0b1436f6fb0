"""The MoM model: config, modality routing and routed projections, the mixer, the Hugging Face models, the recurrent
cache, the dense warm start, and FLOP / parameter accounting from a config.

May import ``mom.ops`` and ``mom.utils``; knows nothing of training, data or DeepSpeed.
"""
