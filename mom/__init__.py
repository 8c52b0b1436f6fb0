"""Mixture-of-Mamba (MoM): multi-modal Mamba language models with modality-aware sparsity.

``import mom`` registers `MoMConfig` / `MoMModel` / `MoMForCausalLM` (and the Transfusion setting's
`MoMTransfusionConfig` / `MoMTransfusionForCausalLM`, under ``AutoModelForCausalLM``) with ``transformers``' Auto
classes, and `MoMProcessor` with ``AutoProcessor`` (a few ms: the image and speech tokenizers load only when used).
"""

from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, AutoProcessor

from mom.model.cache import MoMCache
from mom.model.config import MoMConfig
from mom.model.modeling import MoMForCausalLM, MoMModel
from mom.model.routing import RoutedLinear, Routing
from mom.model.transfusion import MoMTransfusionConfig, MoMTransfusionForCausalLM
from mom.tokenization.processor import MoMProcessor

AutoConfig.register(MoMConfig.model_type, MoMConfig, exist_ok=True)
AutoModel.register(MoMConfig, MoMModel, exist_ok=True)
AutoModelForCausalLM.register(MoMConfig, MoMForCausalLM, exist_ok=True)
AutoProcessor.register(MoMConfig, MoMProcessor, exist_ok=True)
AutoConfig.register(MoMTransfusionConfig.model_type, MoMTransfusionConfig, exist_ok=True)
AutoModelForCausalLM.register(MoMTransfusionConfig, MoMTransfusionForCausalLM, exist_ok=True)

__all__ = ["MoMCache", "MoMConfig", "MoMForCausalLM", "MoMModel", "MoMProcessor", "MoMTransfusionConfig",
           "MoMTransfusionForCausalLM", "RoutedLinear", "Routing"]
