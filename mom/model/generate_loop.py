"""Greedy and sampled decoding in a loop of MoM's own, with no read of the device between steps.

transformers' ``generate()`` checks its stopping criteria on the host after every step on CUDA, so each step waits
for the device and the next step's host work (the loop, the logits processors, the forward's dispatch) cannot
overlap the device's; mamba-ssm's own loop never reads the device when no end-of-sequence token is given. For a
plain call (`plan`: greedy, or sampling with ``temperature`` / ``top_k`` / ``top_p``; ``max_new_tokens`` given,
optionally ``min_new_tokens``, end-of-sequence and padding ids; no other option, stopping criterion, streamer,
assistant or padding mask, and no logits processor but `DeviceLogitsProcessor`s) `MoMForCausalLM.generate` runs
`decode` instead: the prompt's forward, then one `decode_logits` step per token (a CUDA-graph replay where one
applies) and the token chosen on the device, the all-rows-finished check read only every `CHECK_EVERY` steps (a
`DeviceLogitsProcessor` never reads the device, e.g. `mom.generation.document.SpanConstraint`). The tokens are
transformers' (the same fp32 logits through the same processors in transformers' order: the end-of-sequence mask
until ``min_new_tokens``, then the given processors, then transformers' own temperature, top-k and top-p warpers;
then its argmax, or its softmax and ``torch.multinomial``, which draw the same numbers from the same generator; after
a row's end-of-sequence token, padding), and the output is trimmed to the step at which transformers would have
stopped. Everything else goes to transformers' loop.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any

import torch
from transformers import (
    GenerationConfig,
    LogitsProcessor,
    LogitsProcessorList,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from mom.model.cache import MoMCache

CHECK_EVERY = 16  # steps between reads of "all rows finished" (each read waits for the device); only with an EOS id
# generate() keywords that select another loop or change token choice: any of them given -> transformers' loop
OTHER_LOOPS = ("logits_processor", "stopping_criteria", "prefix_allowed_tokens_fn", "synced_gpus", "assistant_model",
               "streamer", "negative_prompt_ids", "negative_prompt_attention_mask", "custom_generate")
# GenerationConfig fields `decode` honours; every other field must be unset, at its default or at a value that
# changes nothing here (a model's generation config states some output flags as False)
HONOURED = {"max_new_tokens", "min_new_tokens", "eos_token_id", "pad_token_id", "bos_token_id", "max_length",
            "use_cache", "do_sample", "num_beams", "temperature", "top_k", "top_p", "_from_model_config",
            "transformers_version"}
TOP_K = 50  # transformers' top_k where the call and the model's generation config leave it unset (it samples top 50)
NEUTRAL = {"output_attentions": False, "output_hidden_states": False, "output_scores": False, "output_logits": False,
           "return_dict_in_generate": False, "num_return_sequences": 1}


class DeviceLogitsProcessor(LogitsProcessor):
    """A logits processor that never reads the device (no ``.tolist()``, ``.item()`` or Python branch on a tensor's
    value): its work is queued like the model's, so MoM's own loop runs it between steps without waiting. A
    ``generate(logits_processor=[...])`` of such processors only stays in that loop; any other processor sends the call
    to transformers' loop."""


@dataclass
class Plan:
    """A plain generate() call: prompt ids (b, l), tokens to add, end-of-sequence ids (or None), padding id, the
    given `DeviceLogitsProcessor` list (or None), and for sampling transformers' warpers (None: greedy)."""

    input_ids: torch.Tensor
    max_new_tokens: int
    min_new_tokens: int
    eos_token_ids: torch.Tensor | None
    pad_token_id: int
    cuda_graph: bool
    prefill_cuda_graph: bool
    warpers: LogitsProcessorList | None = None
    processors: LogitsProcessorList | None = None


def plan(inputs: Any, generation_config: GenerationConfig | None, default: GenerationConfig,
         kwargs: dict[str, Any]) -> Plan | None:
    """The `Plan` of a ``generate(inputs, generation_config, **kwargs)`` call that `decode` computes exactly as
    transformers' greedy search or sampling, or None (transformers' loop then runs it)."""
    processors = kwargs.get("logits_processor")
    if processors and all(isinstance(q, DeviceLogitsProcessor) for q in processors):
        processors = LogitsProcessorList(processors)
        kwargs = {k: v for k, v in kwargs.items() if k != "logits_processor"}
    else:
        processors = None
    for name in OTHER_LOOPS:
        value = kwargs.get(name)
        if value is not None and value is not False and not (isinstance(value, list) and len(value) == 0):
            return None  # an empty processor or criteria list, or synced_gpus=False, changes nothing
    config = copy.deepcopy(generation_config if generation_config is not None else default)
    model_kwargs = config.update(**{k: v for k, v in kwargs.items() if k not in OTHER_LOOPS})
    input_ids = model_kwargs.pop("input_ids", None) if inputs is None else inputs
    cuda_graph = model_kwargs.pop("cuda_graph", True)
    prefill_cuda_graph = model_kwargs.pop("prefill_cuda_graph", True)
    mask = model_kwargs.pop("attention_mask", None)
    if model_kwargs or not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2 or input_ids.numel() == 0:
        return None  # other model inputs (embeddings, a cache, modality ids...) or no plain prompt
    if input_ids.is_floating_point() or not isinstance(cuda_graph, bool) or not isinstance(prefill_cuda_graph, bool):
        return None
    defaults = GenerationConfig().to_dict()
    for key, value in config.to_diff_dict().items():
        if key not in HONOURED and value is not None and value != defaults.get(key) and value != NEUTRAL.get(key):
            return None
    if config.num_beams not in (None, 1) or config.use_cache is False or not config.max_new_tokens:
        return None
    if mask is not None and not bool(torch.as_tensor(mask).all()):
        return None  # padding: transformers' loop handles the mask
    eos = config.eos_token_id
    eos = None if eos is None else [eos] if isinstance(eos, int) else [int(e) for e in eos]
    eos_ids = None if eos is None else torch.tensor(eos, device=input_ids.device)  # (k,)
    pad = config.pad_token_id
    if pad is None:
        pad = eos[0] if eos is not None else 0  # as transformers (it warns and uses the first EOS)
    # transformers fills an unset top_k with its global default, but keeps a top_k=None given to generate(): none
    warpers = sampling_warpers(config, None if "top_k" in kwargs else TOP_K) if config.do_sample else None
    return Plan(input_ids, int(config.max_new_tokens), int(config.min_new_tokens or 0), eos_ids, int(pad), cuda_graph,
                prefill_cuda_graph, warpers, processors)


def sampling_warpers(config: GenerationConfig, unset_top_k: int | None = TOP_K) -> LogitsProcessorList:
    """transformers' own temperature, top-k and top-p warpers, in its order, for a sampling ``config`` (a top_k of
    None: ``unset_top_k``); a bad value raises transformers' own error."""
    warpers = LogitsProcessorList()
    if config.temperature is not None and config.temperature != 1.0:
        warpers.append(TemperatureLogitsWarper(config.temperature))
    top_k = unset_top_k if config.top_k is None else config.top_k
    if top_k is not None and top_k != 0:
        warpers.append(TopKLogitsWarper(top_k=top_k, min_tokens_to_keep=1))
    if config.top_p is not None and config.top_p < 1.0:
        warpers.append(TopPLogitsWarper(top_p=config.top_p, min_tokens_to_keep=1))
    return warpers


@torch.no_grad()
def decode(model: Any, p: Plan) -> torch.Tensor:
    """The tokens after the prompt: (b, l + n) ids, n <= ``max_new_tokens`` (fewer where every row ended)."""
    ids = p.input_ids
    b, length = ids.shape
    out = ids.new_full((b, length + p.max_new_tokens), p.pad_token_id)
    out[:, :length] = ids
    cache = MoMCache(model.config)
    logits = model(ids, cache=cache, use_cache=True, logits_to_keep=1,  # (b, V) fp32
                   cuda_graph=p.prefill_cuda_graph).logits[:, -1]
    unfinished = torch.ones(b, dtype=torch.bool, device=ids.device)
    ended_at = torch.full((b,), p.max_new_tokens, dtype=torch.long, device=ids.device)  # step after a row's EOS
    for t in range(p.max_new_tokens):
        scores = logits
        if p.eos_token_ids is not None and t < p.min_new_tokens:
            scores = scores.index_fill(1, p.eos_token_ids, float("-inf"))  # transformers' MinNewTokens processor
        if p.processors is not None:  # the given ones, after transformers' own and before its warpers
            scores = p.processors(out[:, : length + t], scores)
        if p.warpers is None:
            token = scores.argmax(dim=-1)  # (b,)
        else:  # as transformers: warpers, softmax, one draw per row
            scores = p.warpers(out[:, : length + t], scores)
            token = torch.multinomial(torch.softmax(scores, dim=-1), num_samples=1).squeeze(1)
        if p.eos_token_ids is not None:
            token = torch.where(unfinished, token, p.pad_token_id)
            ends = unfinished & torch.isin(token, p.eos_token_ids)
            ended_at = torch.where(ends, t + 1, ended_at)
            unfinished = unfinished & ~ends
        out[:, length + t] = token
        if t + 1 == p.max_new_tokens:
            break
        if p.eos_token_ids is not None and (t + 1) % CHECK_EVERY == 0 and not bool(unfinished.any()):
            break  # every row has ended
        logits = model(token[:, None], cache=cache, use_cache=True, cuda_graph=p.cuda_graph).logits[:, -1]
    steps = p.max_new_tokens
    if p.eos_token_ids is not None and not bool(unfinished.any()):
        steps = int(ended_at.max())  # transformers stops at the step where the last row ended
    return out[:, : length + steps]
