import pytest
import torch

import mom
from mom.model.config import PROJECTIONS


def test_defaults_and_derived_sizes():
    c = mom.MoMConfig(vocab_sizes=(10, 20, 5), d_model=32)
    assert c.vocab_size == 35 and c.vocab_offsets == (0, 10, 30)
    assert c.d_inner == 64 and c.dt_rank == 2  # ceil(32 / 16)
    assert c.decouple == PROJECTIONS


def test_modality_of_maps_contiguous_ranges():
    c = mom.MoMConfig(vocab_sizes=(10, 20, 5))
    ids = torch.tensor([[0, 9, 10, 29, 30, 34]])
    assert c.modality_of(ids).tolist() == [[0, 0, 1, 1, 2, 2]]
    with pytest.raises(ValueError, match="token id 35"):
        c.modality_of(torch.tensor([35]))
    with pytest.raises(ValueError, match="token id -1"):
        c.modality_of(torch.tensor([-1]))


def test_decouple_is_canonicalised_and_round_trips():
    c = mom.MoMConfig(decouple=["out_proj", "in_proj"])
    assert c.decouple == ("in_proj", "out_proj")
    c2 = mom.MoMConfig.from_dict(c.to_dict())
    assert c2.decouple == c.decouple and c2.modalities == c.modalities and c2.vocab_sizes == c.vocab_sizes


@pytest.mark.parametrize(
    "kwargs, field",
    [
        (dict(decouple=["in_proj", "gate_proj"]), "decouple"),
        (dict(modalities=[], vocab_sizes=[]), "modalities"),
        (dict(modalities=["text", "text"], vocab_sizes=[2, 2]), "modalities"),
        (dict(vocab_sizes=[10, 10]), "vocab_sizes"),
        (dict(vocab_sizes=[10, 0, 10]), "vocab_sizes"),
        (dict(d_model=0), "d_model"),
        (dict(n_layer=-1), "n_layer"),
        (dict(d_state=0), "d_state"),
        (dict(expand=0), "expand"),
        (dict(dt_rank=0), "dt_rank"),
        (dict(dt_init="zeros"), "dt_init"),
    ],
)
def test_invalid_config_names_the_field(kwargs, field):
    with pytest.raises(ValueError, match=field):
        mom.MoMConfig(**kwargs)
