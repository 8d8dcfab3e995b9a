"""The store of a mixed buffer (gvpo_trl/buffer/store.py): eviction by use count, staleness and capacity, and
its state, which round-trips bit for bit."""

import torch

from gvpo_trl.buffer import SampleBuffer

from .helpers import filled_buffer


def test_reuse_counts_evict_at_the_cap_and_are_saved():
    buf = filled_buffer({"a": [0, 0, 0]})  # uids 0..2
    assert buf.record_uses([0, 1]) == [] and [s.uses for s in buf.samples()] == [1, 1, 0]  # no cap: counted only
    assert buf.record_uses([1, 2], max_reuse=2) == [1] and [s.uid for s in buf.samples()] == [0, 2]
    assert buf.evict([2, 7, 2]) == [2] and [s.uid for s in buf.samples()] == [0]  # unknown uids are ignored
    other = SampleBuffer(10)
    other.load_state_dict(buf.state_dict())
    assert other.digest() == buf.digest() and other[0].uses == 1
    other[0].uses += 1  # the digest sees a use count
    assert other.digest() != buf.digest()
    state = buf.state_dict()
    del state["samples"][0]["uses"]  # a buffer saved before use counts existed loads with none
    other.load_state_dict(state)
    assert other[0].uses == 0


def test_staleness_limit_and_capacity_evict_what_they_should():
    buf = filled_buffer({"a": [0, 3, 5, 7], "b": [2, 6]})  # uids: a 0..3, b 4..5
    assert [s.uid for s in buf.candidates("a", step=8, max_staleness=3)] == [2, 3]  # 8-5=3 ok, 8-3=5 stale
    assert buf.evict_stale(step=8, max_staleness=3) == [0, 1, 4]  # staleness 8, 5, 6 > 3
    assert [s.uid for s in buf.samples()] == [2, 3, 5]
    assert buf.evict_stale(step=8, max_staleness=3) == []
    assert [s.uid for s in buf.candidates("a", step=8, max_staleness=3, exclude={3})] == [2]
    # capacity: first in, first out, whatever the prompt or step
    buf = filled_buffer({"a": [9, 9], "b": [1]}, capacity=2)  # uids a: 0, 1; b: 2 (inserted last, though older)
    assert buf.evict_over_capacity() == [0]
    assert [s.uid for s in buf.samples()] == [1, 2] and len(buf.samples("a")) == 1
    buf.add("c", [1], "c", [0.0], None, 10)
    assert buf.evict_over_capacity() == [1] and [s.key for s in buf.samples()] == ["b", "c"]
    assert buf.samples("a") == [] and buf.candidates("a", 10, 100) == []


def test_buffer_state_round_trips_exactly(tmp_path):
    buf = filled_buffer({"a": [0, 1], "b": [2]})
    buf.add("c", [3], [{"role": "assistant", "content": "x"}], [float("nan"), 1.0], None, 3)
    state = buf.state_dict()
    path = tmp_path / "buffer_state.pt"
    torch.save(state, path)
    other = SampleBuffer(1000)
    other.load_state_dict(torch.load(path, weights_only=True))
    assert other.digest() == buf.digest() and other.next_uid == 4
    other.samples("a")[0].logps[0] += 1e-7  # one bit differs: the digest sees it
    assert other.digest() != buf.digest()
