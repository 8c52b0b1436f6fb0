"""MoM's own generate loop (`mom.model.generate_loop`) against transformers' loop, the oracle: the same tokens,
padding and length for every plain greedy or sampling call it takes (sampling: the same draws from the same seed),
every other call left to transformers, and no read of the device between steps but the every-`CHECK_EVERY` check of
"all rows ended"."""

import threading

import pytest
import torch
from helpers import interleaved_ids, needs_generate_cache, tiny_config
from transformers import GenerationMixin, LogitsProcessorList, RepetitionPenaltyLogitsProcessor

import mom
from mom.model import generate_loop, routing

pytestmark = needs_generate_cache


def hf_generate(model, prompt, **kwargs):
    """transformers' own loop (the override bypassed)."""
    return GenerationMixin.generate(model, prompt, **kwargs)


def model_and_prompt(seed=0, **config):
    torch.manual_seed(seed)
    model = mom.MoMForCausalLM(tiny_config(**config)).eval()
    return model, interleaved_ids(model.config, 3, [(0, 3), (1, 4), (2, 2)])


def eos_ids(tokens, picks):
    """End-of-sequence ids that some rows emit: token ``tokens[row, step]`` for each (row, step) in picks."""
    return sorted({int(tokens[r, s]) for r, s in picks})


@pytest.mark.parametrize("config", [{}, {"mixer": "mamba2", "headdim": 8, "d_state": 8, "chunk_size": 4},
                                    {"n_layer": 3, "attention_layers": [1], "attention_heads": 2}],
                         ids=["mamba1", "mamba2", "hybrid"])
def test_plain_greedy_equals_transformers_loop(config, monkeypatch):
    model, prompt = model_and_prompt(**config)
    calls = []
    monkeypatch.setattr(generate_loop, "decode", lambda m, p, real=generate_loop.decode: calls.append(p) or real(m, p))
    ours = model.generate(prompt, max_new_tokens=12, do_sample=False)
    assert len(calls) == 1 and torch.equal(ours, hf_generate(model, prompt, max_new_tokens=12, do_sample=False))
    empty = model.generate(prompt, max_new_tokens=12, do_sample=False, logits_processor=LogitsProcessorList(),
                           synced_gpus=False, cuda_graph=False)  # keywords that change nothing: still MoM's loop
    assert len(calls) == 2 and torch.equal(empty, ours)
    assert ours.shape == (3, prompt.shape[1] + 12)
    # end-of-sequence ids that the rows emit at different steps: padding after each row's end, same length
    l0 = prompt.shape[1]
    eos = eos_ids(ours[:, l0:], [(0, 2), (1, 5)])
    for kwargs in ({"eos_token_id": eos}, {"eos_token_id": eos, "pad_token_id": 1},
                   {"eos_token_id": eos, "min_new_tokens": 4}, {"eos_token_id": eos[0], "max_new_tokens": 40}):
        args = {"max_new_tokens": 12, "do_sample": False, **kwargs}
        ours, theirs = model.generate(prompt, **args), hf_generate(model, prompt, **args)
        assert torch.equal(ours, theirs), kwargs
    assert len(calls) == 6


def test_every_row_ending_early_stops_where_transformers_stops():
    model, prompt = model_and_prompt(seed=1)
    free = model.generate(prompt, max_new_tokens=6, do_sample=False)[:, prompt.shape[1]:]
    eos = eos_ids(free, [(0, 1), (1, 2), (2, 0)])  # every row ends within 3 steps
    for new in (6, generate_loop.CHECK_EVERY + 5):  # ends found at the end, or at the periodic check
        args = {"max_new_tokens": new, "do_sample": False, "eos_token_id": eos}
        ours = model.generate(prompt, **args)
        assert torch.equal(ours, hf_generate(model, prompt, **args))
        assert ours.shape[1] <= prompt.shape[1] + 3


@pytest.mark.parametrize("sampling", [
    {}, {"temperature": 0.7, "top_k": 5}, {"top_p": 0.8}, {"top_k": 0, "temperature": 1.3},
    {"top_k": 3, "top_p": 0.9, "min_new_tokens": 3}, {"top_k": None},  # top_k=None given: no top-k in transformers
], ids=lambda a: "-".join(f"{k}{v}" for k, v in a.items()) or "defaults")
def test_sampling_draws_what_transformers_draws(sampling, monkeypatch):
    model, prompt = model_and_prompt(vocab_sizes=(400, 24, 16))  # a text vocabulary larger than top_k's default 50
    calls = []
    monkeypatch.setattr(generate_loop, "decode", lambda m, p, real=generate_loop.decode: calls.append(p) or real(m, p))
    free = model.generate(prompt, max_new_tokens=10, do_sample=False)[:, prompt.shape[1]:]
    for eos in (None, eos_ids(free, [(0, 1), (1, 4)])):  # greedy's tokens: likely drawn too
        args = {"max_new_tokens": 10, "do_sample": True, "eos_token_id": eos, **sampling}
        torch.manual_seed(7)
        ours = model.generate(prompt, **args)
        torch.manual_seed(7)
        assert torch.equal(ours, hf_generate(model, prompt, **args)), args
        greedy = model.generate(prompt, **{**args, "do_sample": False})
        assert not torch.equal(ours, greedy)  # drawn, not the argmax (30 tokens of a near-uniform tiny model)
    assert len(calls) == 5  # the greedy calls and the sampled ones all ran in MoM's loop


@pytest.mark.parametrize("extra", [
    {"do_sample": True, "typical_p": 0.9}, {"do_sample": True, "min_p": 0.1}, {"repetition_penalty": 1.3},
    {"num_beams": 2}, {"return_dict_in_generate": True},
    {"logits_processor": LogitsProcessorList([RepetitionPenaltyLogitsProcessor(1.5)])},
    {"max_new_tokens": None, "max_length": 14}, {"min_length": 12},
    {"attention_mask": "left-padded"},
], ids=lambda e: "-".join(e))
def test_other_calls_go_to_transformers_loop(extra, monkeypatch):
    model, prompt = model_and_prompt()
    if extra.get("attention_mask") == "left-padded":
        mask = torch.ones_like(prompt)
        mask[0, :2] = 0
        extra = {"attention_mask": mask}
    monkeypatch.setattr(generate_loop, "decode", lambda *a: pytest.fail("MoM's loop took a call it must leave"))
    args = {"max_new_tokens": 5, "do_sample": False, **extra}
    if args.get("do_sample"):
        torch.manual_seed(3)
    ours = model.generate(prompt, **args)
    if args.get("do_sample"):
        torch.manual_seed(3)
    theirs = hf_generate(model, prompt, **args)
    if isinstance(ours, torch.Tensor):
        assert torch.equal(ours, theirs)
    else:
        assert torch.equal(ours.sequences, theirs.sequences)


def test_no_read_of_the_device_between_steps(monkeypatch):
    model, prompt = model_and_prompt()
    # each row's experts picked on the device, as on a GPU (on a CPU the step reads its counts: free there)
    monkeypatch.setattr(routing.project_rows, "__defaults__", (True,))
    reads = {"n": 0, "on": False}
    for name in ("item", "tolist", "__bool__", "__int__", "__float__"):
        real = getattr(torch.Tensor, name)

        def counted(*args, _real=real, **kwargs):
            if reads["on"] and threading.current_thread() is threading.main_thread():
                reads["n"] += 1
            return _real(*args, **kwargs)

        monkeypatch.setattr(torch.Tensor, name, counted)
    prefill = []
    for new in (2, 30):  # 28 more steps read nothing more
        reads.update(n=0, on=True)
        model.generate(prompt, max_new_tokens=new, do_sample=False)
        reads["on"] = False
        prefill.append(reads["n"])
    assert prefill[0] == prefill[1] <= 1  # the prompt's forward's own input check at most
    eos = int(model.generate(prompt, max_new_tokens=40, do_sample=False)[0, -1]) + 1  # an id no row writes soon
    reads.update(n=0, on=True)
    out = model.generate(prompt, max_new_tokens=40, do_sample=False, eos_token_id=eos)
    reads["on"] = False
    assert out.shape[1] <= prompt.shape[1] + 40
    assert reads["n"] <= prefill[0] + 40 // generate_loop.CHECK_EVERY + 1  # the periodic checks and the final one


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_graph_loop_equals_transformers_loop(dtype):
    """On the GPU MoM's loop replays the decode graph: the tokens of transformers' loop (which replays it too),
    greedy and sampled."""
    model, prompt = model_and_prompt()
    model = model.to("cuda", dtype)
    model.keep_ssm_params_fp32()
    prompt = prompt.cuda()
    args = {"max_new_tokens": 24, "do_sample": False}
    ours = model.generate(prompt, **args)
    assert model.decode_graphs.captures >= 1  # the steps replayed a graph
    assert torch.equal(ours, hf_generate(model, prompt, **args))
    eos = eos_ids(ours[:, prompt.shape[1]:], [(0, 3), (2, 7)])
    assert torch.equal(model.generate(prompt, eos_token_id=eos, **args),
                       hf_generate(model, prompt, eos_token_id=eos, **args))
    sampled = {**args, "do_sample": True, "top_k": 10, "temperature": 0.8}
    torch.manual_seed(5)
    ours = model.generate(prompt, **sampled)
    torch.manual_seed(5)
    assert torch.equal(ours, hf_generate(model, prompt, **sampled))


class EvenIdsOnly(generate_loop.DeviceLogitsProcessor):
    """A processor that reads nothing on the host: odd ids masked off."""

    def __call__(self, input_ids, scores):
        return scores.masked_fill(torch.arange(scores.shape[1]) % 2 == 1, float("-inf"))


@pytest.mark.parametrize("sampling", [False, True])
def test_device_logits_processors_run_in_moms_loop(sampling, monkeypatch):
    model, prompt = model_and_prompt()
    calls = []
    monkeypatch.setattr(generate_loop, "decode", lambda m, p, real=generate_loop.decode: calls.append(p) or real(m, p))
    args = {"max_new_tokens": 10, "do_sample": sampling, "logits_processor": LogitsProcessorList([EvenIdsOnly()]),
            "min_new_tokens": 2, "eos_token_id": 2}
    torch.manual_seed(5)
    ours = model.generate(prompt, **args)
    torch.manual_seed(5)
    theirs = hf_generate(model, prompt, **args)
    assert len(calls) == 1 and torch.equal(ours, theirs)
    assert (ours[:, prompt.shape[1]:] % 2 == 0).all()  # the processor ran (the padding id 2 is even too)
    # a list with any other processor: transformers' loop
    mixed = LogitsProcessorList([EvenIdsOnly(), RepetitionPenaltyLogitsProcessor(1.5)])
    torch.manual_seed(5)
    model.generate(prompt, **{**args, "logits_processor": mixed})
    assert len(calls) == 1
