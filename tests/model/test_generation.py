import pytest
import torch
from helpers import interleaved_ids, tiny_config

import mom

RUNS = [(0, 4), (1, 7), (0, 2), (2, 6), (0, 3)]


def test_token_by_token_logits_match_full_forward():
    model = mom.MoMForCausalLM(tiny_config()).eval()
    ids = interleaved_ids(model.config, 2, RUNS)
    with torch.no_grad():
        full = model(ids).logits
        cache = mom.MoMCache(model.config, batch_size=2)
        steps = [model(ids[:, t : t + 1], cache=cache, use_cache=True).logits for t in range(ids.shape[1])]
    torch.testing.assert_close(torch.cat(steps, dim=1), full, atol=1e-5, rtol=1e-5)
    assert cache.seqlen_offset == ids.shape[1]


def test_prefill_then_steps_match_full_forward():
    model = mom.MoMForCausalLM(tiny_config()).eval()
    ids = interleaved_ids(model.config, 2, RUNS)
    with torch.no_grad():
        full = model(ids).logits
        out = model(ids[:, :10], use_cache=True)
        rest = model(ids[:, 10:], cache=out.cache, use_cache=True).logits  # several tokens after prefill
    torch.testing.assert_close(torch.cat([out.logits, rest], dim=1), full, atol=1e-5, rtol=1e-5)


def test_generate_greedy_equals_manual_argmax_and_cache_is_constant_size():
    model = mom.MoMForCausalLM(tiny_config()).eval()
    prompt = interleaved_ids(model.config, 2, [(0, 3), (1, 4)])
    generated = model.generate(prompt, max_new_tokens=6, do_sample=False)
    assert generated.shape == (2, prompt.shape[1] + 6)
    ids = prompt
    with torch.no_grad():
        for _ in range(6):
            ids = torch.cat([ids, model(ids).logits[:, -1:].argmax(-1)], dim=1)
    assert torch.equal(generated, ids)
    # the recurrent state does not grow with the sequence
    cache = mom.MoMCache(model.config, batch_size=2)
    sizes = []
    with torch.no_grad():
        for t in range(ids.shape[1]):
            model(ids[:, t : t + 1], cache=cache, use_cache=True)
            sizes.append(sum(s.numel() for s in cache.conv_states + cache.ssm_states))
    assert len(set(sizes)) == 1


def test_generate_with_left_padding_equals_each_row_alone():
    model = mom.MoMForCausalLM(tiny_config(pad_token_id=0)).eval()
    long = interleaved_ids(model.config, 1, [(0, 3), (1, 5)])
    short = interleaved_ids(model.config, 1, [(0, 2), (2, 3)])
    pad = long.shape[1] - short.shape[1]
    batch = torch.cat([long, torch.cat([torch.zeros(1, pad, dtype=torch.long), short], dim=1)])
    mask = torch.ones_like(batch)
    mask[1, :pad] = 0
    together = model.generate(batch, attention_mask=mask, max_new_tokens=5, do_sample=False)
    for row, alone in ((0, long), (1, short)):
        expected = model.generate(alone, max_new_tokens=5, do_sample=False)[:, -5:]
        assert torch.equal(together[row : row + 1, -5:], expected)


def test_cache_is_allocated_by_the_first_forward_for_its_batch():
    model = mom.MoMForCausalLM(tiny_config()).eval()
    cache = mom.MoMCache(model.config)  # as generate() builds it, before the batch is known
    assert not cache.is_initialized and cache.batch_size == -1 and cache.get_seq_length() == 0
    ids = interleaved_ids(model.config, 3, RUNS)
    with torch.no_grad():
        model(ids[:, :5], cache=cache, use_cache=True)
        assert cache.batch_size == 3 and cache.get_seq_length() == 5
        with pytest.raises(ValueError, match="the cache holds 3 rows but the input has 2"):
            model(ids[:2, 5:6], cache=cache, use_cache=True)
