"""Asynchronous saves (issue 12 #11): the training thread is held only to copy the state, into
staging buffers kept from the previous save; every file holds the state as it was at submit.
How long the thread is held is measured in benchmarks/b03_checkpoint_save.py, not here."""

from __future__ import annotations

import collections

import torch

from trainctl import checkpoint as ckpt


def test_each_async_save_holds_the_state_at_submit_while_buffers_are_reused(tmp_path):
    weights = torch.zeros(1000)
    bias = torch.zeros(3, 4)
    paths = []
    with ckpt.AsyncSaver() as saver:
        for step in range(5):
            weights.fill_(step)
            bias.fill_(-step)
            state = {"model": collections.OrderedDict(w=weights, b=bias), "step": step}
            if step >= 2:  # state that appears later (an optimizer's moments after its first step)
                state["extra"] = torch.full((7,), float(step))
            paths.append(tmp_path / f"s{step}.pt")
            saver.submit(paths[-1], state, {"step": step})
            weights.fill_(-100.0)  # the training thread goes on: no saved file may see this
            bias.fill_(-100.0)
    for step, path in enumerate(paths):
        state = ckpt.load(path)
        assert state["step"] == step
        assert torch.equal(state["model"]["w"], torch.full((1000,), float(step)))
        assert torch.equal(state["model"]["b"], torch.full((3, 4), float(-step)))
        assert ("extra" in state) == (step >= 2)
        if step >= 2:
            assert torch.equal(state["extra"], torch.full((7,), float(step)))


def test_an_async_save_keeps_tied_weights_tied_like_a_blocking_one(tmp_path):
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 4))
    model[1].weight = model[0].weight
    with ckpt.AsyncSaver() as saver:
        saver.submit(tmp_path / "async.pt", {"model": model.state_dict()}, {"step": 1})
    ckpt.save(tmp_path / "sync.pt", {"model": model.state_dict()}, {"step": 1})
    for name in ("async.pt", "sync.pt"):
        state = ckpt.load(tmp_path / name)["model"]
        assert state["0.weight"].data_ptr() == state["1.weight"].data_ptr(), name
        model.load_state_dict(state)


def test_an_async_save_of_a_view_saves_the_view(tmp_path):
    base = torch.arange(100.0)
    view = base[10:20]
    with ckpt.AsyncSaver() as saver:
        saver.submit(tmp_path / "v.pt", {"v": view, "t": base.t()}, {"step": 1})
    state = ckpt.load(tmp_path / "v.pt")
    assert torch.equal(state["v"], torch.arange(10.0, 20.0)) and torch.equal(state["t"], base)
