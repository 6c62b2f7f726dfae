"""Buffers (BatchNorm running statistics) between a model and its BoundedModule, on every supported
auto_LiRPA: upstream keys ``BoundedModule.state_dict()`` by node names ('/5.buffer'), so the copy
goes by ``named_buffers()``. Covers the two call sites: the sync after each training step and the
resume from a checkpoint."""
import pytest
import torch
import torch.nn as nn
from auto_LiRPA import BoundedModule
from torch.utils.data import TensorDataset

from lirpa_deq._compat import copy_buffers
from lirpa_deq.data import get_dataset
from lirpa_deq.training import TrainConfig, Trainer


def _bn_model(channels=2):
    return nn.Sequential(nn.Conv2d(1, channels, 3), nn.BatchNorm2d(channels), nn.ReLU(), nn.Flatten(),
                         nn.Linear(channels * 4 * 4, 3))


def _buffers(module):
    return {name: buf.clone() for name, buf in module.named_buffers()}


def test_copy_buffers_both_ways_and_the_bounded_copy_uses_them():
    model, x = _bn_model().eval(), torch.rand(4, 1, 6, 6)
    bounded = BoundedModule(model, torch.zeros(1, 1, 6, 6))
    names = [name for name, _ in bounded.named_buffers()]
    assert sorted(names) == ["1.running_mean", "1.running_var"]
    with torch.no_grad():
        for _, buf in bounded.named_buffers():
            buf.copy_(torch.rand_like(buf) + 0.5)
    copy_buffers(bounded, model, into="model")
    model_buffers, bounded_buffers = _buffers(model), _buffers(bounded)
    assert all(torch.equal(model_buffers[n], bounded_buffers[n]) for n in names)
    assert not torch.equal(model_buffers["1.running_var"], torch.ones(2))

    with torch.no_grad():
        model[1].running_mean.fill_(-0.3)
        model[1].running_var.fill_(2.5)
    copy_buffers(bounded, model, into="bounded")
    assert torch.equal(dict(bounded.named_buffers())["1.running_var"], torch.full((2,), 2.5))
    bounded.eval()
    assert torch.allclose(bounded(x), model(x), atol=1e-6)  # the bounded copy computes with them


def test_copy_buffers_refuses_another_model():
    bounded = BoundedModule(_bn_model(2), torch.zeros(1, 1, 6, 6))
    with pytest.raises(RuntimeError, match=r"buffer '1\.running_mean' \(2,\) .* no counterpart .*of shape \(3,\)"):
        copy_buffers(bounded, _bn_model(3), into="bounded")
    with pytest.raises(RuntimeError, match="missing"):
        copy_buffers(bounded, nn.Linear(2, 2), into="model")
    with pytest.raises(ValueError, match="into must be 'model' or 'bounded'"):
        copy_buffers(bounded, _bn_model(2), into="checkpoint")


@pytest.fixture(scope="module")
def digits():
    ds = get_dataset("digits", "train")
    return TensorDataset(ds.tensors[0][:64], ds.tensors[1][:64])


@pytest.mark.filterwarnings("ignore::lirpa_deq.training.RampFitWarning")
def test_resume_restores_batchnorm_buffers_and_continues_exactly(digits, tmp_path):
    cfg = TrainConfig(dataset="digits", model="cnn3", model_kwargs={"width": 2}, method="ibp", eps_train=0.05,
                      epochs=2, batch_size=32, warmup_epochs=0.5, ramp_epochs=1)
    straight = Trainer(cfg, train_set=digits, log=None)
    straight.train(max_steps=4, progress=False)
    first = Trainer(cfg, train_set=digits, log=None)
    first.train(max_steps=2, progress=False)
    saved = _buffers(first.model)
    assert not torch.equal(saved["1.running_mean"], torch.zeros_like(saved["1.running_mean"]))  # trained
    first.save(tmp_path / "c.pt")

    resumed = Trainer.resume(tmp_path / "c.pt", train_set=digits, log=None)
    bounded_buffers = _buffers(resumed.bounded)
    assert bounded_buffers and all(torch.equal(bounded_buffers[n], saved[n]) for n in bounded_buffers)
    resumed.train(max_steps=4, progress=False)
    a, b = straight.model.state_dict(), resumed.model.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
