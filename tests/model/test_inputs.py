"""Tests of mom.model.inputs: a forward's inputs checked and routed (more through the model's forward in
test_model.py, test_padding.py and test_default_call.py)."""

from types import SimpleNamespace

import pytest
import torch

from mom import MoMConfig
from mom.model import inputs
from mom.model.inputs import kept_positions, modality_of_ids, validate_and_route


def test_validate_and_route_derives_the_routing_and_names_bad_ids():
    """Deferred (the default): nothing is read until ``finish()`` (or a path that needs the counts), which reads the
    checks and the counts together and raises for bad ids; not deferred: at once."""
    config = MoMConfig(vocab_sizes=(10, 6, 4), d_model=8, n_layer=1)
    ids = torch.tensor([[0, 12, 15, 3, 17, 19, 9]])  # text, image, image, text, speech, speech, text
    routing, finish = validate_and_route(config, ids, None, ids)
    assert routing.host_counts.known is None and routing.modality_ids.tolist() == [[0, 1, 1, 0, 2, 2, 0]]
    finish()
    assert routing.host_counts.known == (3, 2, 2) and routing.counts == (3, 2, 2)
    routing, _ = validate_and_route(config, ids, None, ids, defer=False)
    assert routing.host_counts.known == (3, 2, 2)
    bad = ids.clone()
    bad[0, 3] = 20
    with pytest.raises(ValueError, match="token id 20 is out of range"):
        validate_and_route(config, bad, None, None, defer=False)
    routing, finish = validate_and_route(config, bad, None, None)  # deferred: no read yet
    with pytest.raises(ValueError, match="token id 20 is out of range"):
        routing.host_counts.read()  # the first path that needs the counts reads the checks with them
    with pytest.raises(ValueError, match="token id 20 is out of range"):
        finish()
    assert routing.host_counts.known is None


@pytest.mark.parametrize("dtype", [torch.int64, torch.int32])
def test_every_check_is_read_in_the_one_read_and_names_its_first_bad_value(dtype):
    """Token ids and modality ids are checked by their range (min and max), the routing and labels position by
    position; each failure names the first bad value, below the range as above it, and the counts come with them."""
    config = MoMConfig(vocab_sizes=(10, 6, 4), d_model=8, n_layer=1)
    ids = torch.tensor([[0, 12, 15, 3, 17, 19, 9]], dtype=dtype)
    modality = modality_of_ids(config, ids).to(dtype)
    labels = ids.clone()
    labels[0, 0] = -100
    routing, _ = validate_and_route(config, ids, modality, labels, defer=False, shift_labels=labels)
    assert routing.host_counts.known == (3, 2, 2)
    cases = [
        (dict(input_ids=(0, 1, -3)), "token id -3 is out of range; valid: \\[0, 20\\)"),
        (dict(input_ids=(0, 5, 25)), "token id 25 is out of range"),
        (dict(modality_ids=(0, 2, 3)), "modality id 3 is out of range; valid: \\[0, 3\\) \\('text'"),
        (dict(modality_ids=(0, 2, -1)), "modality id -1 is out of range"),
        (dict(modality_ids=(0, 4, 1)), "token id 17 belongs to 'speech' but its modality id is 1 \\('image'\\)"),
        (dict(labels=(0, 2, -5)), "label -5 is out of range"),
        (dict(shift_labels=(0, 6, 20)), "shift label 20 is out of range"),
    ]
    for change, message in cases:
        given = dict(input_ids=ids.clone(), modality_ids=modality.clone(), labels=labels.clone(),
                     shift_labels=labels.clone())
        for name, (row, col, value) in change.items():
            given[name][row, col] = value
        with pytest.raises(ValueError, match=message):
            validate_and_route(config, given["input_ids"], given["modality_ids"], given["labels"], defer=False,
                               shift_labels=given["shift_labels"])


def test_modality_of_ids_follows_the_vocabulary_ranges():
    config = MoMConfig(vocab_sizes=(10, 6, 4), d_model=8, n_layer=1)
    ids = torch.tensor([[0, 9, 10, 15, 16, 19]])
    assert modality_of_ids(config, ids).tolist() == [[0, 0, 1, 1, 2, 2]]
    assert modality_of_ids(config, torch.tensor([-100, 25])).tolist() == [0, 2]  # unchecked: out of range at an end


def test_kept_positions():
    assert kept_positions(0) == slice(0, None) and kept_positions(1) == slice(-1, None)
    index = torch.tensor([0, 3])
    assert kept_positions(index) is index
    for bad in (-1, True, 1.5, torch.zeros(2, 2, dtype=torch.long), torch.tensor([0.5])):
        with pytest.raises(ValueError, match="logits_to_keep"):
            kept_positions(bad)


def test_a_rehearsal_takes_a_recorded_forwards_path_on_cuda_tensors_until_it_ends(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: False)  # no graph being recorded
    cuda_like, cpu = SimpleNamespace(is_cuda=True), torch.zeros(1)
    assert not inputs.capturing(cuda_like)
    with pytest.raises(RuntimeError, match="mid-rehearsal"), inputs.rehearsal():
        with inputs.rehearsal():
            assert inputs.capturing(cuda_like) and not inputs.capturing(cpu)
        assert inputs.capturing(cuda_like)  # the outer block still runs
        raise RuntimeError("mid-rehearsal")
    assert not inputs.capturing(cuda_like)
