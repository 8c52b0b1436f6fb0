"""The MoM model: config, modality routing and routed projections, the mixer, the Hugging Face models, the recurrent
cache, the dense warm start, FLOP / parameter accounting from a config, and the Transfusion setting (``diffusion``:
noise schedule, loss and DDIM sampler; ``transfusion``: the model over text tokens and image latents).

May import ``mom.ops`` and ``mom.utils``; knows nothing of training, data or DeepSpeed.
"""
