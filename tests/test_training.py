"""Certified training: schedules, losses, exact resume, checkpoint validation, BN buffer sync."""
import math
import os

import pytest
import torch
from torch.utils.data import TensorDataset

from lirpa_deq.data import get_dataset
from lirpa_deq.training import (CheckpointError, LinearRamp, RampFitWarning, SmoothedRamp, StepLR, TrainConfig,
                                Trainer, certified_loss, load_checkpoint, margin_spec, model_from_checkpoint,
                                robust_ce)
from lirpa_deq.training.schedules import fit_ramp


@pytest.fixture(scope="module")
def digits():
    ds = get_dataset("digits", "train")
    return TensorDataset(ds.tensors[0][:96], ds.tensors[1][:96])


def config(**kw):
    base = dict(dataset="digits", model="fc-deq", model_kwargs={"width": 16}, method="ibp", eps_train=0.1,
                epochs=3, batch_size=32, warmup_epochs=1 / 3, ramp_epochs=1, lr_milestones=(2,))
    base.update(kw)
    return TrainConfig(**base)


# ------------------------------------------------------------------------------------ schedules
def test_smoothed_ramp_is_c1_monotone_and_hits_its_ends():
    s = SmoothedRamp(final=0.2, warmup=10, length=100)
    vals = [s(t) for t in range(0, 130)]
    assert vals[:11] == [0.0] * 11 and vals[110] == pytest.approx(0.2) and vals[-1] == 0.2
    assert all(b >= a - 1e-15 for a, b in zip(vals, vals[1:]))
    mid = 10 + 25  # polynomial / linear junction: equal slopes on both sides
    h = 1e-4
    left, right = (s(mid) - s(mid - h)) / h, (s(mid + h) - s(mid)) / h
    assert left == pytest.approx(right, rel=1e-3) and s(mid - h) == pytest.approx(s(mid + h), abs=1e-6)
    assert s(10 + 5) < 0.2 * 5 / 100  # polynomial start is slower than linear
    assert SmoothedRamp(final=0.3, warmup=2, length=0)(2) == 0.3


def test_linear_ramp_and_step_lr():
    k = LinearRamp(1.0, 0.5, warmup=4, length=4)
    assert [k(t) for t in (0, 4, 6, 8, 100)] == [1.0, 1.0, 0.75, 0.5, 0.5]
    lr = StepLR(1e-3, milestones=(10, 20), gamma=0.2)
    assert [lr(t) for t in (0, 9, 10, 19, 20)] == pytest.approx([1e-3, 1e-3, 2e-4, 2e-4, 4e-5])


# ------------------------------------------------------------------------------------ losses
def test_margin_spec_and_robust_ce():
    y = torch.tensor([0, 3, 9])
    C = margin_spec(y, 10)
    assert C.shape == (3, 9, 10)
    logits = torch.randn(3, 10)
    margins = torch.einsum("bkc,bc->bk", C, logits)
    for b in range(3):
        others = [j for j in range(10) if j != y[b]]
        assert torch.allclose(margins[b], logits[b, y[b]] - logits[b, others])
    # with exact margins, the robust CE is the ordinary cross-entropy
    assert torch.allclose(robust_ce(margins), torch.nn.functional.cross_entropy(logits, y), atol=1e-6)


def test_config_validation():
    with pytest.raises(ValueError, match="unknown training method"):
        config(method="pgd")
    with pytest.raises(ValueError, match="eps_train must be"):
        config(eps_train=-0.1)
    assert TrainConfig.from_dict(config().to_dict()) == config()


# ------------------------------------------------------------------------------------ resume
@pytest.mark.parametrize("kw", [dict(), dict(model="conv-fc-deq", model_kwargs={"width": 8, "channels": 2},
                                             method="crown-ibp")])
def test_resume_is_exact(digits, tmp_path, kw):
    """N steps straight == k steps, checkpoint, resume (fresh process state), N - k steps."""
    cfg = config(**kw)
    straight = Trainer(cfg, train_set=digits, log=None)
    straight.train(max_steps=7, progress=False)  # crosses epoch 2 (3 steps/epoch) and the LR step
    first = Trainer(cfg, train_set=digits, log=None)
    first.train(max_steps=4, progress=False)
    first.save(tmp_path / "c.pt")
    torch.manual_seed(123)  # the resume must not depend on the global RNG state
    resumed = Trainer.resume(tmp_path / "c.pt", train_set=digits, log=None)
    assert resumed.step == 4
    resumed.train(max_steps=7, progress=False)
    a, b = straight.model.state_dict(), resumed.model.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert straight.optimizer.state_dict()["state"][0]["step"] == resumed.optimizer.state_dict()["state"][0]["step"]


@pytest.mark.filterwarnings("ignore::lirpa_deq.training.RampFitWarning")  # 1 epoch: the ramp is fitted
@pytest.mark.parametrize("model", ["cnn3", "deq7"])  # deq7 also has a BatchNorm1d (traced in eval mode)
def test_batchnorm_buffers_follow_training(digits, model):
    cfg = config(model=model, model_kwargs={"width": 2}, eps_train=0.05, epochs=1)
    t = Trainer(cfg, train_set=digits, log=None)
    t.train(progress=False)
    bn = [m for m in t.model.modules() if isinstance(m, torch.nn.BatchNorm2d)][0]
    assert bn.running_mean.abs().sum() > 0  # updated through the BoundedModule, copied back
    state = dict(t.bounded.named_buffers())  # the model's names (state_dict keys are node names upstream)
    name = [k for k in state if k.endswith("running_mean")][0]
    assert torch.equal(state[name], dict(t.model.named_buffers())[name])


# ------------------------------------------------------------------------------------ checkpoints
def test_checkpoint_roundtrip_and_errors(digits, tmp_path):
    t = Trainer(config(), train_set=digits, log=None)
    t.train(max_steps=2, progress=False)
    path = t.save(tmp_path / "c.pt")
    assert [p for p in os.listdir(tmp_path) if p != "c.pt"] == []  # no temp file left behind
    data = load_checkpoint(path)
    assert data["step"] == 2 and data["config"]["model"] == "fc-deq"
    model = model_from_checkpoint(data)
    x = digits.tensors[0][:4]
    t.model.eval()
    assert torch.allclose(model(x), t.model(x))

    with pytest.raises(CheckpointError, match="does not exist"):
        load_checkpoint(tmp_path / "missing.pt")
    (tmp_path / "garbage.pt").write_bytes(b"not a checkpoint at all")
    with pytest.raises(CheckpointError, match="corrupt"):
        load_checkpoint(tmp_path / "garbage.pt")
    raw = open(path, "rb").read()
    (tmp_path / "trunc.pt").write_bytes(raw[: len(raw) // 2])
    with pytest.raises(CheckpointError, match="corrupt"):
        load_checkpoint(tmp_path / "trunc.pt")
    torch.save({"weights": 1}, tmp_path / "other.pt")
    with pytest.raises(CheckpointError, match="not a lirpa_deq checkpoint"):
        load_checkpoint(tmp_path / "other.pt")
    with pytest.raises(CheckpointError, match="model is 'fc-deq' in the checkpoint but 'cnn3' here"):
        Trainer.resume(path, config=config(model="cnn3", model_kwargs={"width": 2}), train_set=digits, log=None)
    with pytest.raises(CheckpointError, match="model_kwargs"):
        Trainer.resume(path, config=config(model_kwargs={"width": 8}), train_set=digits, log=None)
    # a config change that keeps the run's identity (more epochs) is allowed
    more = Trainer.resume(path, config=config(epochs=4), train_set=digits, log=None)
    assert more.step == 2 and more.total_steps == 12


def test_training_improves_certified_loss(digits):
    """A few epochs of IBP training on 96 digits lower the certified loss and learn something."""
    t = Trainer(config(epochs=6, eps_train=0.02, warmup_epochs=0, ramp_epochs=1, lr=5e-3, lr_milestones=()),
                train_set=digits, log=None)
    first = t.train_step()
    t.train(progress=False)
    assert t.metrics["loss"] < first["loss"] and t.metrics["clean_acc"] > 0.3
    assert math.isfinite(t.metrics["train_seconds"])


def test_num_train_takes_a_class_balanced_subset():
    """The embedded splits are ordered by class: a prefix of 400 images would hold only zeros."""
    trainer = Trainer(config(dataset="mnist5k", num_train=400), log=None)
    assert len(trainer.Y) == 400 and len(set(trainer.Y.tolist())) == 10


# ------------------------------------------------------------------------------------ refused input
def test_fit_ramp():
    assert fit_ramp(10, 50, 100, 10) == (10, 50, False)  # ends at step 60 <= 100 - 10: untouched
    assert fit_ramp(10, 50, 60, 10) == (8, 42, True)     # 60 > 50: scaled by 50/60, ends at 50
    assert fit_ramp(0, 0, 1, 10) == (0, 0, False)
    assert fit_ramp(3, 9, 6, 10) == (0, 3, True)         # < 2 epochs: the second half at the final value
    assert fit_ramp(3, 9, 1, 10) == (0, 0, True)         # one step: at the final value
    w, r, fitted = fit_ramp(3, 15, 30, 3)
    assert (w, r, fitted) == (3, 15, False)
    with pytest.raises(ValueError):
        fit_ramp(-1, 3, 10, 2)


def test_short_run_fits_the_ramp_and_ends_at_eps_train(digits):
    """epochs 2 < warm-up 1/3 + ramp 1 + last epoch: before, the last steps trained part-way up the ramp."""
    cfg = config(epochs=2, eps_train=0.1)  # 3 steps/epoch: warm 1 + ramp 3 steps, total 6
    with pytest.warns(RampFitWarning, match=r"shrunk to 0 \+ 3 steps so that the last 3 step\(s\) \(the last "
                                             r"epoch\) train at eps_train=0.1"):
        t = Trainer(cfg, train_set=digits, log=None)
    assert t.ramp_steps == (0, 3) and t.ramp_note
    assert [t.schedule(s)["eps"] for s in range(3, 6)] == [0.1] * 3 and t.schedule(1)["eps"] < 0.1
    assert t.schedule(5)["kappa"] == cfg.kappa_final
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error", RampFitWarning)
        long = Trainer(config(epochs=3), train_set=digits, log=None)  # 1 + 3 <= 9 - 3: no warning
    assert long.ramp_steps == (1, 3) and long.ramp_note is None


def test_resume_keeps_the_fitted_ramp(digits, tmp_path):
    with pytest.warns(RampFitWarning):
        t = Trainer(config(epochs=2), train_set=digits, log=None)
    t.train(max_steps=4, progress=False)
    t.save(tmp_path / "c.pt")
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error", RampFitWarning)  # the saved (fitted) ramp fits the longer run
        more = Trainer.resume(tmp_path / "c.pt", config=config(epochs=4), train_set=digits, log=None)
    assert more.ramp_steps == (0, 3) and more.schedule(4)["eps"] == 0.1  # no drop back down the ramp
    with pytest.warns(RampFitWarning):  # same short config: fitted again, and said again
        same = Trainer.resume(tmp_path / "c.pt", train_set=digits, log=None)
    assert same.ramp_steps == (0, 3)


def test_nan_weights_never_saved_or_loaded(digits, tmp_path):
    t = Trainer(config(), train_set=digits, log=None)
    good = t.save(tmp_path / "c.pt")
    before = open(good, "rb").read()
    with torch.no_grad():
        next(t.model.parameters()).view(-1)[0] = float("nan")
    with pytest.raises(FloatingPointError, match=r"has NaN / inf in .*\(at step 0; .*c.pt was not overwritten\)"):
        t.save(tmp_path / "c.pt")
    assert open(good, "rb").read() == before and os.listdir(tmp_path) == ["c.pt"]
    data = load_checkpoint(good)  # a checkpoint written with NaN weights by someone else:
    data["model_state"] = {k: v.clone() for k, v in data["model_state"].items()}
    name = next(iter(data["model_state"]))
    data["model_state"][name].view(-1)[0] = float("inf")
    torch.save(data, tmp_path / "nan.pt")
    with pytest.raises(CheckpointError, match=f"nan.pt' has NaN / inf weights \\('{name}'\\): it cannot be "
                                              "evaluated or resumed"):
        load_checkpoint(tmp_path / "nan.pt")
    with pytest.raises(CheckpointError, match="NaN / inf weights"):
        model_from_checkpoint(data)
    with pytest.raises(CheckpointError, match="NaN / inf weights"):
        Trainer.resume(tmp_path / "nan.pt", train_set=digits, log=None)


def test_truncated_checkpoint_says_what_to_do(digits, tmp_path):
    raw = open(Trainer(config(), train_set=digits, log=None).save(tmp_path / "c.pt"), "rb").read()
    for cut in (10, len(raw) // 3, len(raw) - 10):
        (tmp_path / "t.pt").write_bytes(raw[:cut])
        with pytest.raises(CheckpointError, match=r"t.pt' is corrupt, truncated or not a torch file \(.*\); delete "
                                                  r"it and train again, or use another checkpoint \(lirpa-deq train: "
                                                  r"another --out\)"):
            load_checkpoint(tmp_path / "t.pt")


def test_training_input_validated(digits):
    X, Y = digits.tensors
    bad = [(TensorDataset(X.clone().fill_(float("nan")), Y), "the training images contains"),
           (TensorDataset(X * 255, Y), "outside the data domain clip=(0.0, 1.0)"),
           (TensorDataset(X.double(), Y), "the training images is float64 but the model's parameters are float32"),
           (TensorDataset(X, Y + 10), "the training labels has labels in [10, 19], outside [0, 10)")]
    for data, needle in bad:
        with pytest.raises(ValueError) as info:
            Trainer(config(), train_set=data, log=None)
        assert needle in str(info.value)


def test_certified_loss_refuses_negative_eps(digits):
    t = Trainer(config(), train_set=digits, log=None)
    x, y = t.batch(0)
    with pytest.raises(ValueError, match="did you mean eps=0.1"):  # before: silently the natural loss
        certified_loss(t.bounded, x, y, -0.1, "ibp", kappa=0.5)
