"""Soundness under every input: the public entry points of training / evaluation refuse bad input up
front (lirpa_deq.validate) with a message that says what is wrong and how to fix it -- never a
certified number (a negative eps is an empty box x_L = x + 0.5 > x_U = x - 0.5 that any bound
encloses; a NaN eps certifies nothing)."""
import io
import json
import math
import os

import numpy as np
import pytest
import torch

from lirpa_deq.cli.report import write_json, write_json_lines
from lirpa_deq.data import get_dataset
from lirpa_deq.models import build_model
from lirpa_deq.training import certified_loss, certify_bounds, make_bounded, margin_lower_bounds, pgd_robust, predict
from lirpa_deq import validate as V
from lirpa_deq.training.checkpoint import atomic_write


@pytest.fixture(scope="module")
def setup():
    torch.manual_seed(0)
    ds = get_dataset("digits", "train")
    x, y = ds.tensors[0][:16], ds.tensors[1][:16]
    model = build_model("fc-deq", tuple(x.shape[1:]), 10, width=16).eval()
    return model, x, y, make_bounded(model, x[:1])


NEG = "eps must be a finite real number >= 0 (the radius of the perturbation ball), got -0.5: a negative radius " \
      "is an empty ball, not a certificate; did you mean eps=0.5?"
BAD_EPS = [(-0.5, "did you mean eps=0.5"), (float("nan"), "a NaN radius certifies nothing"),
           (float("inf"), "use a finite radius"), ("0.1", "of type str"), (True, "of type bool"),
           (torch.tensor([0.1, 0.2]), "of type Tensor"), (None, "of type NoneType")]


def entry_points(setup):
    """Every public eps-taking entry point of lirpa_deq.training, as eps -> call."""
    model, x, y, bounded = setup
    return {
        "certify_bounds": lambda e: certify_bounds(model, x, y, e),
        "certify_bounds CROWN": lambda e: certify_bounds(model, x, y, e, "CROWN", bounded=bounded),
        "margin_lower_bounds": lambda e: margin_lower_bounds(bounded, x, y, e),
        "pgd_robust": lambda e: pgd_robust(model, x, y, e, steps=2),
        "certified_loss": lambda e: certified_loss(bounded, x, y, e, "ibp", kappa=0.5),
    }


def test_negative_eps_exact_message(setup):
    model, x, y, _ = setup
    with pytest.raises(ValueError) as info:
        certify_bounds(model, x, y, -0.5)
    assert str(info.value) == NEG


@pytest.mark.parametrize("eps,needle", BAD_EPS)
def test_bad_eps_refused_everywhere(setup, eps, needle):
    for name, call in entry_points(setup).items():
        with pytest.raises(ValueError, match="eps must be a finite real number >= 0") as info:
            call(eps)
        assert needle in str(info.value), name


def test_valid_eps_spellings_still_work(setup):
    model, x, y, bounded = setup
    ref, margin = certify_bounds(model, x, y, 0.0, bounded=bounded)
    for eps in (0, np.float32(0.0), torch.tensor(0.0)):
        c, m = certify_bounds(model, x, y, eps, bounded=bounded)
        assert torch.equal(c, ref) and torch.allclose(m, margin)
    assert torch.equal(ref, predict(model, x) == y)  # eps = 0: certified exactly where correct


def test_x_dtype_message(setup):
    model, x, y, bounded = setup
    msg = "x is float64 but the model's parameters are float32; use x.float() or model.double()"
    for call in (lambda: certify_bounds(model, x.double(), y, 0.1), lambda: pgd_robust(model, x.double(), y, 0.1),
                 lambda: margin_lower_bounds(bounded, x.double(), y, 0.1), lambda: predict(model, x.double())):
        with pytest.raises(ValueError) as info:
            call()
        assert str(info.value) == msg
    with pytest.raises(ValueError, match=r"x is float32 but the model's parameters are float64; use x.double\(\) "
                                         r"or model.float\(\)"):
        certify_bounds(build_model("fc-deq", (1, 8, 8), 10, width=4).double(), x, y, 0.1)


@pytest.mark.parametrize("make,needle", [
    (lambda x: torch.where(torch.arange(x.numel()).view(x.shape) == 3, torch.tensor(float("nan")), x),
     "x contains 1 NaN and 0 infinite values"),
    (lambda x: x.clone().fill_(float("inf")), f"x contains 0 NaN and {16 * 64} infinite values"),
    (lambda x: x * 2 - 0.5, "outside the data domain clip=(0.0, 1.0)"),
    (lambda x: x[:0], "must be a non-empty batch"),
    (lambda x: x[0, 0, 0], "must be a non-empty batch of shape (B, *input_shape), got shape (8,)"),
    (lambda x: (x * 255).long(), "must be a floating tensor, got torch.int64; use x.float()"),
    (lambda x: x.numpy(), "x must be a torch.Tensor"),
])
def test_bad_x_refused(setup, make, needle):
    model, x, y, bounded = setup
    bad = make(x)
    for call in (lambda: certify_bounds(model, bad, y, 0.1), lambda: pgd_robust(model, bad, y, 0.1),
                 lambda: margin_lower_bounds(bounded, bad, y, 0.1)):
        with pytest.raises(ValueError) as info:
            call()
        assert needle in str(info.value)


@pytest.mark.parametrize("make,needle", [
    (lambda y: y.view(-1, 1), "y must have shape (B,) = (16,), one label per input, got (16, 1); use y.view(-1)"),
    (lambda y: y[:8], "y must have shape (B,) = (16,), one label per input, got (8,)"),
    (lambda y: y.float(), "y must hold integer class indices, got torch.float32; use y.long()"),
    (lambda y: y + 10, "y has labels in [10, 19], outside [0, 10) (num_classes=10)"),
    (lambda y: y - 1, "outside [0, 10)"),
    (lambda y: y.tolist(), "y must be a torch.Tensor of class indices, got list"),
])
def test_bad_labels_refused(setup, make, needle):
    model, x, y, _ = setup
    bad = make(y)
    if isinstance(bad, torch.Tensor) and bad.dtype == torch.long and bad.min() < 0 and bad.numel() == 16:
        assert int(bad.min()) == -1  # the y - 1 case really has a negative label
    for call in (lambda: certify_bounds(model, x, bad, 0.1), lambda: pgd_robust(model, x, bad, 0.1)):
        with pytest.raises(ValueError) as info:
            call()
        assert needle in str(info.value)


def test_unknown_method_lists_valid_ones(setup):
    model, x, y, bounded = setup
    for m in ("alpha-crown", "forward", "", None):
        with pytest.raises(ValueError) as info:
            certify_bounds(model, x, y, 0.1, method=m, bounded=bounded)
        assert str(info.value) == f"unknown bound method {m!r}; valid: IBP, CROWN, CROWN-IBP, CROWN-Optimized"
    with pytest.raises(ValueError, match="unknown training method 'pgd'; valid: natural, ibp, crown-ibp"):
        certified_loss(bounded, x, y, 0.1, "pgd")
    # any case of a valid name is the same method
    a = certify_bounds(model, x, y, 0.02, method="crown", bounded=bounded)[1]
    b = certify_bounds(model, x, y, 0.02, method="CROWN", bounded=bounded)[1]
    assert torch.equal(a, b)


def test_other_arguments_refused(setup):
    model, x, y, bounded = setup
    cases = [
        (lambda: certify_bounds(model, x, y, 0.1, num_classes=5), "num_classes=5 but the model outputs 10 logits"),
        (lambda: certify_bounds(model, x, y, 0.1, num_classes=1), "num_classes must be >= 2"),
        (lambda: certify_bounds(model, x, y, 0.1, norm=1), "norm must be math.inf (l_inf) or 2 (l2), got 1"),
        (lambda: certify_bounds(model, x, y, 0.1, clip=(1, 0)), "clip must be None or a pair (lo, hi)"),
        (lambda: certify_bounds(model, x, y, 0.1, batch_size=0), "batch_size must be a positive integer, got 0"),
        (lambda: pgd_robust(model, x, y, 0.1, steps=0), "steps must be a positive integer, got 0"),
        (lambda: pgd_robust(model, x, y, 0.1, step_size=float("nan")), "step_size must be None or a finite"),
        (lambda: margin_lower_bounds(bounded, x, y, 0.1, "CROWN-IBP", beta=1.5), "beta must be a number in [0, 1]"),
        (lambda: certified_loss(bounded, x, y, 0.1, "ibp", kappa=-1), "kappa must be a number in [0, 1]"),
    ]
    for call, needle in cases:
        with pytest.raises(ValueError) as info:
            call()
        assert needle in str(info.value)


def test_nan_weights_refused(setup):
    _, x, y, _ = setup
    model = build_model("fc-deq", (1, 8, 8), 10, width=16).eval()
    with torch.no_grad():
        next(model.parameters()).view(-1)[0] = float("nan")
    name = next(n for n, _ in model.named_parameters())
    for call in (lambda: certify_bounds(model, x, y, 0.1), lambda: pgd_robust(model, x, y, 0.1)):
        with pytest.raises(ValueError, match=f"the model has NaN / inf in '{name}': it cannot be evaluated"):
            call()


def test_wrong_input_shape_refused(setup):
    model, x, y, _ = setup
    with pytest.raises(ValueError, match=r"the model cannot be applied to inputs of shape \(8,\) \(x is "
                                         r"\(B, \*input_shape\)\)"):
        certify_bounds(model, x[:, 0, 0], y, 0.1)


def test_x_outside_domain_allowed_without_clip(setup):
    model, x, y, bounded = setup
    c, m = certify_bounds(model, x + 2, y, 0.0, clip=None, bounded=bounded)
    assert c.shape == (16,) and torch.isfinite(m).all()


# ------------------------------------------------------------------------------------ helpers
def test_check_helpers_return_normalised_values():
    assert V.check_eps(np.float64(0.25)) == 0.25 and isinstance(V.check_eps(torch.tensor([0.5])), float)
    assert V.check_method("crown-optimized", V.BOUND_METHODS) == "CROWN-Optimized"
    assert V.check_norm(float("inf")) == math.inf and V.check_norm(2) == 2
    assert V.check_clip([0, 1]) == (0.0, 1.0) and V.check_clip(None) is None
    assert V.check_sample_sizes(10, 100) == (10, 100)
    with pytest.raises(ValueError, match=r"n \(estimation samples, 10\) must be >= n0 \(selection samples, 100\)"):
        V.check_sample_sizes(100, 10)
    with pytest.raises(ValueError, match="alpha must be in the open interval"):
        V.check_alpha(1.0)
    with pytest.raises(ValueError, match="sigma must be a positive finite number, got nan"):
        V.check_sigma(float("nan"))


def test_writability_checks(tmp_path):
    afile = tmp_path / "afile"
    afile.write_text("x")
    assert V.check_writable_dir(tmp_path / "new" / "dir") == str(tmp_path / "new" / "dir")
    assert (tmp_path / "new" / "dir").is_dir() and os.listdir(tmp_path / "new" / "dir") == []  # probe removed
    with pytest.raises(ValueError, match=r"--out '.*afile' is not a writable directory \(File exists\): choose "
                                         r"another --out"):
        V.check_writable_dir(afile)
    with pytest.raises(ValueError, match=r"--json '.*sub.json' cannot be written: its directory '.*afile' is not "
                                         r"writable"):
        V.check_writable_file(afile / "sub.json")
    with pytest.raises(ValueError, match="is a directory: give a file name"):
        V.check_writable_file(tmp_path)
    assert V.check_writable_file(tmp_path / "ok.json") == str(tmp_path / "ok.json")


def test_atomic_writes_keep_the_old_file_on_failure(tmp_path, monkeypatch):
    path = tmp_path / "out.jsonl"
    write_json_lines(path, [{"a": 1}], {"s": 2})
    old = path.read_text()
    assert [json.loads(line) for line in old.splitlines()] == [{"a": 1}, {"summary": {"s": 2}}]

    def boom(out):
        out.write("partial")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        atomic_write(path, boom, mode="w")
    assert path.read_text() == old and os.listdir(tmp_path) == ["out.jsonl"]  # no temp file left
    monkeypatch.setattr(json, "dump", lambda *a, **k: (_ for _ in ()).throw(OSError(28, "No space left")))
    with pytest.raises(OSError):
        write_json(path, {"b": 1})
    assert path.read_text() == old and os.listdir(tmp_path) == ["out.jsonl"]


# ------------------------------------------------------------------------------------ progress
class _Tty(io.StringIO):
    def isatty(self):
        return True


def test_pgd_progress_bar_only_on_a_tty(setup, monkeypatch):
    model, x, y, _ = setup
    for stream, shown in ((io.StringIO(), False), (_Tty(), True)):
        monkeypatch.setattr("sys.stderr", stream)
        ref = pgd_robust(model, x, y, 0.1, steps=3, progress=True)
        assert ("PGD eps=0.1" in stream.getvalue()) is shown
        assert torch.equal(ref, pgd_robust(model, x, y, 0.1, steps=3))  # the bar does not change the attack
    monkeypatch.setattr("sys.stderr", _Tty())
    pgd_robust(model, x, y, 0.1, steps=3)
    assert "PGD" not in __import__("sys").stderr.getvalue()  # progress=False: never a bar
