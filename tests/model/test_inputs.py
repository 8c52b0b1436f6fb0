"""Tests of mom.model.inputs: a forward's inputs checked and routed (more through the model's forward in
test_model.py, test_padding.py and test_default_call.py)."""

import pytest
import torch

from mom import MoMConfig
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
