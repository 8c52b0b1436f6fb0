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
