"""Prefetcher: the loader's batches and exact resume states, read ahead in a worker thread; errors reach the caller."""

import threading

import pytest
import torch
from test_loader import cfg, make_docs, same, write_corpus

from mom.data.corpus import build_loader
from mom.data.prefetch import Prefetcher
from mom.utils.errors import BadInputError


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return write_corpus(tmp_path_factory.mktemp("corpus"), make_docs(60), make_docs(6, seed=1, first_id=1000))


def take(it, n):
    return [next(it) for _ in range(n)]


@pytest.mark.parametrize("depth", [0, 1, 3])
def test_same_batches_and_a_state_that_resumes_exactly(root, depth):
    c = cfg(root, mixture={"text": 1.5}, seq_len=13)
    reference = take(build_loader(c), 40)  # beyond the first epoch
    batches = Prefetcher(build_loader(c), depth=depth)
    assert same(take(batches, 7), reference[:7])
    state = batches.state_dict()  # the worker has read further; the state is that of the 7th batch
    assert same(take(batches, 5), reference[7:12])
    resumed = build_loader(c)  # the bare loader resumes from a Prefetcher's state, and the other way round
    resumed.load_state_dict(state)
    assert same(take(resumed, 5), reference[7:12])
    batches.load_state_dict(resumed.state_dict())  # rewinds: batches read ahead are dropped
    assert same(take(batches, 28), reference[12:40])
    batches.close()


def test_prepare_runs_in_the_worker_and_items_pass_through(root):
    threads = []

    def prepare(batch):
        threads.append(threading.current_thread().name)
        return {"ids": batch["input_ids"], "count": int(batch["input_ids"].numel())}

    batches = Prefetcher(build_loader(cfg(root)), prepare, depth=2)
    item = next(batches)
    assert set(item) == {"ids", "count"} and item["count"] == 2 * 16 and isinstance(item["ids"], torch.Tensor)
    assert threads and set(threads) == {"mom-prefetch"}
    batches.close()  # stops a worker blocked on the full queue
    assert threading.active_count() == sum(t.name != "mom-prefetch" for t in threading.enumerate())


def test_end_of_data_and_loader_errors_reach_the_caller(root, tmp_path):
    one_epoch = cfg(root, num_epochs=1)
    assert same(list(Prefetcher(build_loader(one_epoch))), list(build_loader(one_epoch)))
    docs = make_docs(10)
    docs[7]["input_ids"][2] = 64  # out of the unified vocabulary [0, 64)
    bad = write_corpus(tmp_path / "bad", docs, shards=1)
    with pytest.raises(BadInputError, match=r"doc_id 7: token id 64 out of range"):
        list(Prefetcher(build_loader(cfg(bad, num_epochs=1))))
    with pytest.raises(ValueError, match="prefetch depth"):
        Prefetcher(build_loader(one_epoch), depth=-1)
