import pytest
import torch
import torch.nn.functional as F

from mom.model.routing import RoutedLinear, Routing

MODALITIES = ("text", "image", "speech")


def per_token_reference(x, modality_ids, layer: RoutedLinear):
    """Oracle: y[t] = W[m_t] x[t] + b[m_t], one token at a time."""
    experts = list(layer.values())
    rows = [
        F.linear(xt, experts[m].weight, experts[m].bias)
        for xt, m in zip(x.reshape(-1, x.shape[-1]), modality_ids.reshape(-1).tolist())
    ]
    return torch.stack(rows).reshape(*x.shape[:-1], -1)


def check_against_reference(modality_ids):
    layer = RoutedLinear(MODALITIES, 6, 5, bias=True).double()
    x = torch.randn(*modality_ids.shape, 6, dtype=torch.float64, requires_grad=True)
    routing = Routing.build(modality_ids, len(MODALITIES))
    y = layer(x, routing)
    x_ref = x.detach().clone().requires_grad_()
    ref_layer = RoutedLinear(MODALITIES, 6, 5, bias=True).double()
    ref_layer.load_state_dict(layer.state_dict())
    y_ref = per_token_reference(x_ref, modality_ids, ref_layer)
    torch.testing.assert_close(y, y_ref)
    g = torch.randn_like(y)
    y.backward(g)
    y_ref.backward(g)
    torch.testing.assert_close(x.grad, x_ref.grad)
    for name in MODALITIES:
        for p, p_ref in zip(layer[name].parameters(), ref_layer[name].parameters()):
            if p_ref.grad is None:  # modality absent: the reference never touched it, ours has an exact zero grad
                assert p.grad is not None and torch.count_nonzero(p.grad) == 0
            else:
                torch.testing.assert_close(p.grad, p_ref.grad)


def test_uneven_counts():
    ids = torch.zeros(3, 50, dtype=torch.long)
    ids[:, 10:13] = 1  # 9 image tokens
    ids[1, 40:] = 2  # 10 speech tokens in one row only
    ids[2, 0] = 2
    check_against_reference(ids)


def test_missing_modality_and_single_modality():
    ids = torch.randint(0, 2, (2, 31))  # no speech at all
    check_against_reference(ids)
    check_against_reference(torch.full((2, 7), 2))  # speech only


def test_random_interleaving_counts_and_permutation():
    ids = torch.randint(0, 3, (4, 33))
    routing = Routing.build(ids, 3)
    assert list(routing.counts) == torch.bincount(ids.flatten(), minlength=3).tolist()
    flat = ids.flatten()
    assert torch.equal(flat[routing.perm], flat.sort(stable=True).values)
    assert torch.equal(routing.perm[routing.inv_perm], torch.arange(flat.numel()))
    check_against_reference(ids)


@pytest.mark.parametrize("num_modalities", [1, 3, 300])
def test_the_permutation_is_the_stable_sort_of_the_modality_ids(num_modalities):
    """``perm`` (built without a sort, from the one-hot's cumsum) is exactly the stable argsort of the modality ids,
    and ``inv_perm`` its inverse; ids out of range (rejected later by the model's checks) still give a permutation,
    the stable sort of the clamped ids; no tokens, an empty one."""
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, num_modalities, (3, 41), generator=g)
    routing = Routing.build(ids, num_modalities)
    assert torch.equal(routing.perm, torch.argsort(ids.flatten(), stable=True))
    assert torch.equal(routing.perm[routing.inv_perm], torch.arange(ids.numel()))
    bad = ids.clone()
    bad[0, :3] = torch.tensor([-1, num_modalities, 1000])
    bad_routing = Routing.build(bad, num_modalities)
    assert torch.equal(bad_routing.perm, torch.argsort(bad.flatten().clamp(0, num_modalities - 1), stable=True))
    assert torch.equal(bad_routing.perm[bad_routing.inv_perm], torch.arange(ids.numel()))
    empty = Routing.build(ids[:0], num_modalities)
    assert empty.perm.shape == empty.inv_perm.shape == (0,)


def test_every_expert_is_called_even_without_grad():
    """Under ZeRO-3 every rank must call the same modules, whatever modalities its batch holds."""
    layer = RoutedLinear(MODALITIES, 4, 3, bias=False)
    called = []
    for name, expert in layer.items():
        expert.register_forward_hook(lambda m, i, o, name=name: called.append(name))
    routing = Routing.build(torch.ones(2, 5, dtype=torch.long), 3)  # image only
    with torch.no_grad():
        torch.testing.assert_close(layer(torch.ones(2, 5, 4), routing), layer["image"](torch.ones(2, 5, 4)))
    assert called[:3] == list(MODALITIES)


def test_experts_are_plain_linear_modules_addressable_by_name():
    layer = RoutedLinear(MODALITIES, 4, 3, bias=False)
    assert [n for n, _ in layer.named_modules()][1:] == ["text", "image", "speech"]
    assert all(type(m) is torch.nn.Linear for m in layer.values())


def test_counts_given_by_the_caller_are_checked_and_used():
    ids = torch.randint(0, 3, (2, 17))
    routing = Routing(ids, 3)
    try:
        routing.set_counts((1, 2, 3))  # 6 tokens, not 34
    except ValueError as err:
        assert "do not match" in str(err)
    else:
        raise AssertionError("counts that do not sum to the token count were accepted")
    counts = tuple(torch.bincount(ids.flatten(), minlength=3).tolist())
    routing.set_counts(counts)
    assert routing.counts == counts and routing.bounds[-1][1] == ids.numel()


def test_routes_for_the_fused_mixer_once_per_dtype():
    """`Routing.routes`: what the fused Function reads, built once per dtype for all layers: the permutation and its
    inverse, each expert's block (ends on the device; counts on the host, shared, read only when asked), each token's
    expert and the one-hot."""
    ids = torch.tensor([[2, 0, 1, 0, 2], [1, 1, 0, 2, 0]])
    routing = Routing.build(ids, 3)
    routes = routing.routes(torch.bfloat16)
    assert routes is routing.routes(torch.bfloat16) and routes is not routing.routes(torch.float32)
    assert routes.perm is routing.perm and routes.inv_perm is routing.inv_perm
    assert routes.counts is routing.host_counts and routes.counts.known is None  # not read: the offsets suffice
    assert routes.offsets.tolist() == [4, 7, 10] and routes.num_experts == 3
    assert routing.bounds == ((0, 4), (4, 7), (7, 10)) and routes.counts.blocks() == routing.bounds  # read now
    assert routes.expert_ids.tolist() == ids.flatten().tolist()
    assert routes.onehot.dtype == torch.bfloat16
    assert torch.equal(routes.onehot.argmax(0), ids.flatten()) and routes.onehot.sum().item() == ids.numel()


def test_last_tokens_are_each_rows_last_positions_and_their_sorted_rows_built_once():
    """`Routing.last_tokens(k)`: row by row, the flat indices of each row's last k positions and where they sit in
    the sorted order; the same tensors at every call with that k (the block and its mixer share them)."""
    routing = Routing(torch.tensor([[0, 1, 2, 1, 0], [2, 2, 0, 1, 1]]), 3)
    tokens, rows = routing.last_tokens(2)
    assert tokens.tolist() == [3, 4, 8, 9]
    assert torch.equal(routing.perm[rows], tokens)
    assert routing.last_tokens(1)[0].tolist() == [4, 9]
    assert all(a is b for a, b in zip(routing.last_tokens(2), (tokens, rows), strict=True))
