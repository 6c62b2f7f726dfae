"""The torchdeq drop-in (lirpa_deq.interop.torchdeq): torchdeq's own idioms, settings, norms, refusals."""
import argparse
import copy
import math

import pytest
import torch
import torch.nn as nn

import lirpa_deq
from auto_LiRPA import BoundedModule, BoundedTensor, PerturbationLpNorm
from lirpa_deq.interop import ClosureError, deq_settings
from lirpa_deq.interop import get_deq as lirpa_get_deq

torchdeq = pytest.importorskip("torchdeq")
from torchdeq.norm import apply_norm, reset_norm  # noqa: E402


class Layer(nn.Module):
    """A torchdeq-style cell f(z, u)."""

    def __init__(self, n, scale=0.5):
        super().__init__()
        self.W = nn.Linear(n, n)
        with torch.no_grad():
            self.W.weight.mul_(scale / torch.linalg.matrix_norm(self.W.weight, ord=2))

    def forward(self, z, u):
        return torch.tanh(self.W(z) + u)


class TorchDEQModel(nn.Module):
    """The README's pattern: get_deq(args), apply_norm on the cell, reset_norm in forward, a closure."""

    def __init__(self, get_deq, args, n=12, norm=None, scale=0.5):
        super().__init__()
        self.inj, self.f, self.head, self.n = nn.Linear(5, n), Layer(n, scale), nn.Linear(n, 3), n
        if norm:
            apply_norm(self.f, norm)
            for _ in range(30):  # torchdeq's spectral norm estimates sigma by power iteration in training mode
                reset_norm(self.f)
        self.deq = get_deq(args)

    def forward(self, x):
        reset_norm(self.f)
        u = self.inj(x)
        z0 = torch.zeros(x.shape[0], self.n, dtype=x.dtype)
        f = lambda z: self.f(z, u)  # noqa: E731
        z_out, info = self.deq(f, z0)
        return self.head(z_out[-1])


ARGS = argparse.Namespace(f_solver="fixed_point_iter", f_max_iter=200, f_tol=1e-9, b_solver="fixed_point_iter",
                          b_max_iter=60, b_tol=1e-8, core="sliced", ift=True, norm_type="weight_norm", lr=1e-3)


def test_settings_map_onto_lirpa_deq():
    s = deq_settings(vars(ARGS))
    assert (s["solver"], s["backward_solver"], s["max_iter"], s["tol"]) == ("fixed_point_iter", "fixed_point_iter", 200, 1e-9)
    assert (s["backward_max_iter"], s["backward_tol"]) == (60, 1e-8)
    s = deq_settings({"f_solver": "anderson", "f_max_iter": 30, "eval_factor": 2.0, "tau": 0.5},
                     solver_kwargs={"tau": 0.7, "m": 4, "lam": 1e-3})
    assert (s["solver"], s["max_iter"], s["damping"], s["m"], s["lam"]) == ("anderson", 60, 0.7, 4, 1e-3)
    assert "damping" not in deq_settings({"tau": 0.5})  # the configuration's tau is PhantomGrad's
    assert deq_settings({"f_max_iter": 30, "eval_factor": 2.0}, training=True)["max_iter"] == 30
    assert deq_settings({"f_max_iter": 30}, solver_kwargs={"f_max_iter": 7})["max_iter"] == 7
    parser = argparse.ArgumentParser()
    torchdeq.add_deq_args(parser)  # torchdeq's own argument parser, with its defaults
    s = deq_settings(vars(parser.parse_args(["--f_solver", "anderson", "--f_max_iter", "25", "--f_tol", "1e-4"])))
    assert (s["solver"], s["backward_solver"], s["max_iter"], s["tol"], s["backward_tol"]) == \
        ("anderson", "fixed_point_iter", 25, 1e-4, 1e-6)
    assert lirpa_get_deq(parser.parse_args([])).config["core"] == "sliced"
    assert deq_settings({"f_solver": "simple_fixed_point_iter"})["solver"] == "fixed_point_iter"
    with pytest.raises(ValueError, match="no lirpa_deq counterpart"):
        lirpa_get_deq(f_solver="newton")


def test_call_time_solver_kwargs_reach_the_solver():
    torch.manual_seed(0)
    model = TorchDEQModel(lirpa_get_deq, ARGS).eval()
    x = torch.randn(2, 5)
    y = model(x)
    u = model.inj(x)
    z_out, info = model.deq(lambda z: model.f(z, u), torch.zeros(2, model.n), solver_kwargs={"tau": 0.5})
    assert model.deq.layer.solver_opts == {"damping": 0.5}
    assert torch.allclose(model.head(z_out[-1]), y, atol=1e-5)  # same fixed point, damped iteration
    _, info = model.deq(lambda z: model.f(z, u), torch.zeros(2, model.n), solver_kwargs={"f_max_iter": 2})
    assert float(info["nstep"].max()) <= 2


@pytest.mark.parametrize("norm", [None, "weight_norm", "spectral_norm"])
def test_drop_in_matches_torchdeq_forward_and_trains(norm):
    torch.manual_seed(0)
    ours = TorchDEQModel(lirpa_get_deq, ARGS, norm=norm)
    torch.manual_seed(0)  # (torchdeq-normed modules cannot be deep-copied: the same seed builds the twin)
    theirs = TorchDEQModel(torchdeq.get_deq, ARGS, norm=norm)
    x = torch.randn(4, 5)
    ours.eval(), theirs.eval()
    assert torch.allclose(ours(x), theirs(x), atol=1e-5)
    ours.train()
    loss = ours(x).square().sum()
    loss.backward()
    grads = {name: p.grad for name, p in ours.named_parameters()}
    assert all(g is not None and torch.isfinite(g).all() for g in grads.values()), sorted(grads)
    cell_grads = [g.abs().sum() for name, g in grads.items() if name.startswith("f.")]
    assert cell_grads and all(float(g) > 0 for g in cell_grads)  # implicit gradients reach the (normed) cell
    assert set(ours.state_dict()) == set(theirs.state_dict())  # the drop-in adds no state


# torchdeq's spectral norm rescales W to norm g = 1 (its default): tanh(W z + u) is then not a proved
# contraction (L = 1 + rounding), and the Picard containment bounds it (torchdeq's default solver)
@pytest.mark.parametrize("norm,guarantee", [("weight_norm", "unique-fixed-point"), ("spectral_norm", "picard-limit")])
def test_normed_torchdeq_model_gets_bounds(norm, guarantee):
    torch.manual_seed(1)
    model = TorchDEQModel(lirpa_get_deq, ARGS, norm=norm).eval()
    x = torch.randn(3, 5)
    bounded = BoundedModule(model, x)
    assert torch.allclose(bounded(x), model(x), atol=1e-5)
    ptb = PerturbationLpNorm(norm=math.inf, eps=0.05)
    lb, ub = bounded.compute_bounds(x=(BoundedTensor(x, ptb),), method="CROWN")
    (node,) = lirpa_deq.deq_nodes(bounded)
    assert node.box_info["guarantee"] == guarantee
    assert bool(torch.isfinite(lb).all() and (lb <= ub).all())
    assert float((ub - lb).detach().max()) < 5.0


def test_weights_changed_by_training_rebuild_the_bounds():
    torch.manual_seed(2)
    model = TorchDEQModel(lirpa_get_deq, ARGS, norm="weight_norm").eval()
    x = torch.randn(2, 5)
    bounded = BoundedModule(model, x)
    ptb = PerturbationLpNorm(norm=math.inf, eps=0.02)
    lb1, _ = bounded.compute_bounds(x=(BoundedTensor(x, ptb),), method="IBP")
    with torch.no_grad():
        model.f.W.weight_g.mul_(0.5)  # torchdeq's weight = g v / ||v||: a new weight, same parameters' names
    model(x)  # the user's forward runs reset_norm
    lb2, ub2 = bounded.compute_bounds(x=(BoundedTensor(x, ptb),), method="IBP")
    truth = model(x)
    assert not torch.allclose(lb1, lb2)
    assert bool((lb2 <= truth + 1e-5).all() and (truth <= ub2 + 1e-5).all())


def test_torchdeq_normed_cell_in_a_lirpa_deq_layer():
    torch.manual_seed(3)
    cell = Layer(6)
    apply_norm(cell, "weight_norm")
    reset_norm(cell)  # with gradients: the normalized weight carries a graph
    model = nn.Sequential(nn.Linear(4, 6), lirpa_deq.nn.DEQ(cell), nn.Linear(6, 2)).eval()
    x = torch.randn(2, 4)
    bounded = BoundedModule(model, x)
    lb, ub = bounded.compute_bounds(x=(BoundedTensor(x, PerturbationLpNorm(norm=math.inf, eps=0.05)),), method="IBP")
    y = model(x)
    assert bool((lb <= y + 1e-5).all() and (y <= ub + 1e-5).all())
    with torch.no_grad():  # new weights, recomputed without a gradient graph (docs/existing_deq.md)
        cell.W.weight_g.mul_(0.7)
        reset_norm(cell)
    lb2, ub2 = bounded.compute_bounds(x=(BoundedTensor(x, PerturbationLpNorm(norm=math.inf, eps=0.05)),), method="IBP")
    y2 = model(x)
    assert not torch.allclose(y, y2) and bool((lb2 <= y2 + 1e-5).all() and (y2 <= ub2 + 1e-5).all())


def test_torchdeq_layer_itself_is_refused_with_the_drop_in():
    model = TorchDEQModel(torchdeq.get_deq, ARGS).eval()
    with pytest.raises(TypeError, match="from lirpa_deq.interop.torchdeq import get_deq"):
        BoundedModule(model, torch.randn(2, 5))


def test_unsupported_closures_are_refused():
    deq = lirpa_get_deq(f_max_iter=5)
    cell = Layer(4)
    u, v = torch.randn(2, 4), torch.randn(2, 4)
    with pytest.raises(ClosureError, match="exactly one injection tensor"):
        deq(lambda z: cell(z, u + v) + v * 0 + u * 0 if False else cell(z, u) + v, torch.zeros(2, 4))
    with pytest.raises(ClosureError, match="one tensor state"):
        deq(lambda a, b: (cell(a, u), b), (torch.zeros(2, 4), torch.zeros(2, 4)))
    W = nn.Parameter(torch.randn(4, 4) * 0.1)
    with pytest.raises(ClosureError, match="outside any nn.Module call"):
        deq(lambda z: torch.tanh(cell(z, u) + z @ W), torch.zeros(2, 4))
    with pytest.raises(ClosureError, match="Python function"):
        deq(cell, torch.zeros(2, 4))


def test_copies_and_pickles_drop_the_closure_layer():
    import pickle
    model = TorchDEQModel(lirpa_get_deq, ARGS).eval()
    x = torch.randn(2, 5)
    y = model(x)
    assert model.deq.layer is not None
    clone = copy.deepcopy(model)
    assert clone.deq.layer is None and torch.allclose(clone(x), y, atol=1e-6)
    assert clone.deq.layer.cell.f is clone.f  # rebuilt over the copy's own modules
    restored = pickle.loads(pickle.dumps(model.deq))
    assert restored.layer is None
