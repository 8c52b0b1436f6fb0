"""generate() as transformers runs it for its own Mamba: beam search, continuing from a returned cache, assisted
decoding, extra outputs, eos, the prefill's logits_to_keep."""

import pytest
import torch
from helpers import interleaved_ids, needs_generate_cache, tiny_config
from transformers import Cache

import mom
from mom.model.modeling import GENERATE_CARRIES_CACHE

PROMPT_RUNS = [(0, 3), (1, 4)]


def _model(seed: int = 0, **overrides) -> mom.MoMForCausalLM:
    torch.manual_seed(seed)
    return mom.MoMForCausalLM(tiny_config(**overrides)).eval()


def _prompt(model, batch: int = 2) -> torch.Tensor:
    return interleaved_ids(model.config, batch, PROMPT_RUNS, generator=torch.Generator().manual_seed(1))


def test_beam_search_with_cache_equals_beam_search_without():
    model = _model()
    prompt = _prompt(model)
    kwargs = dict(max_new_tokens=6, do_sample=False, num_beams=3, num_return_sequences=2)
    with_cache = model.generate(prompt, **kwargs)
    without = model.generate(prompt, use_cache=False, **kwargs)
    assert with_cache.shape == (4, prompt.shape[1] + 6)
    assert torch.equal(with_cache, without)


def test_cache_reorder_selects_rows():
    config = tiny_config()
    cache = mom.MoMCache(config, batch_size=3)
    for i, s in enumerate(cache.conv_states + cache.ssm_states):
        s.copy_(torch.arange(3, dtype=s.dtype).view(3, 1, 1) + 10 * i)
    cache.reorder_cache(torch.tensor([2, 2, 0]))
    for i, s in enumerate(cache.conv_states + cache.ssm_states):
        assert s[:, 0, 0].tolist() == [2 + 10 * i, 2 + 10 * i, 10 * i]


@needs_generate_cache
def test_generate_continues_from_the_cache_it_returned():
    model = _model()
    prompt = _prompt(model)
    first = model.generate(prompt, max_new_tokens=4, do_sample=False, return_dict_in_generate=True)
    assert isinstance(first.cache, Cache) and isinstance(first.cache, mom.MoMCache)
    # every token but the last generated one went through the model
    assert first.cache.get_seq_length() == first.sequences.shape[1] - 1
    continued = model.generate(first.sequences, cache=first.cache, max_new_tokens=4, do_sample=False)
    assert torch.equal(continued, model.generate(prompt, max_new_tokens=8, do_sample=False))


@needs_generate_cache
def test_assisted_decoding_equals_greedy_and_rolls_the_cache_back(monkeypatch):
    model, assistant = _model(0), _model(1)  # a different assistant: its drafts get rejected, the cache rolled back
    prompt = _prompt(model, batch=1)
    crops = []
    crop = mom.MoMCache.crop
    monkeypatch.setattr(mom.MoMCache, "crop", lambda self, n: (crops.append(n), crop(self, n))[1])
    greedy = model.generate(prompt, max_new_tokens=10, do_sample=False)
    assisted = model.generate(prompt, max_new_tokens=10, do_sample=False, assistant_model=assistant)
    assert torch.equal(assisted, greedy)
    assert any(n < 0 for n in crops)  # some draft tokens were rejected and removed from a cache


def test_cache_crop_restores_the_recorded_state():
    model = _model()
    ids = interleaved_ids(model.config, 1, [(0, 4), (2, 5)])
    with torch.no_grad():
        reference = model(ids[:, :6], use_cache=True).cache
        cache = mom.MoMCache(model.config)
        cache.activate_past_recording(recurrent_states_to_keep=4)
        model(ids, cache=cache, use_cache=True)  # 9 tokens, the last 4 recorded
        assert cache.is_croppable and cache.get_seq_length() == 9
        cache.crop(-3)
    assert cache.get_seq_length() == 6
    for a, b in zip(cache.conv_states + cache.ssm_states, reference.conv_states + reference.ssm_states):
        torch.testing.assert_close(a, b)
    with pytest.raises(ValueError, match="only 0 were recorded"):
        cache.crop(-1)  # the record went with the crop


def test_generate_returns_hidden_states_and_passes_extra_arguments():
    model = _model()
    prompt = _prompt(model)
    out = model.generate(prompt, max_new_tokens=3, do_sample=False, return_dict_in_generate=True,
                         output_hidden_states=True)
    assert out.hidden_states is not None and len(out.hidden_states) == 3
    for step in out.hidden_states:
        assert len(step) == model.config.n_layer + 1
    assert out.hidden_states[0][0].shape == (2, prompt.shape[1], model.config.d_model)
    if GENERATE_CARRIES_CACHE:  # later steps feed only the new token
        assert out.hidden_states[1][0].shape == (2, 1, model.config.d_model)


def test_prefill_computes_only_the_last_logits():
    model = _model()
    prompt = _prompt(model)
    shapes = []
    handle = model.lm_head.register_forward_hook(lambda module, args, output: shapes.append(tuple(output.shape)))
    try:
        model.generate(prompt, max_new_tokens=2, do_sample=False)
    finally:
        handle.remove()
    assert shapes[0] == (2, 1, model.config.vocab_size)  # not (2, prompt length, V)


def test_generate_stops_at_the_configured_eos():
    model = _model()
    prompt = _prompt(model, batch=1)
    free = model.generate(prompt, max_new_tokens=8, do_sample=False)
    eos = int(free[0, prompt.shape[1] + 2])  # the third generated token
    first = (free[0, prompt.shape[1] :] == eos).nonzero()[0].item()  # it may come earlier
    stopping = _model(eos_token_id=eos, pad_token_id=0)
    assert stopping.config.eos_token_id == eos
    out = stopping.generate(prompt, max_new_tokens=8, do_sample=False)
    assert torch.equal(out, free[:, : prompt.shape[1] + first + 1])
    assert out[0, -1].item() == eos


def test_empty_prompt_is_a_value_error():
    model = _model()
    with pytest.raises(ValueError, match="empty"):
        model.generate(torch.zeros(1, 0, dtype=torch.long), max_new_tokens=2)


@needs_generate_cache
def test_generate_from_inputs_embeds_equals_generate_from_ids():
    model = _model()
    prompt = _prompt(model)
    embeds = model.get_input_embeddings()(prompt)
    from_ids = model.generate(prompt, max_new_tokens=4, do_sample=False)
    from_embeds = model.generate(inputs_embeds=embeds, modality_ids=model.config.modality_of(prompt),
                                 max_new_tokens=4, do_sample=False)
    assert torch.equal(from_embeds, from_ids[:, prompt.shape[1] :])  # transformers returns the new tokens only
