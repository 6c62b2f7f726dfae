"""auto_LiRPA works through `import lirpa_deq` on explicit networks: every bound method we rely on is
sound (contains sampled, vertex and PGD outputs) on MLP and CNN models."""
import math

import pytest
import torch
import torch.nn as nn
from auto_LiRPA import BoundedModule, BoundedParameter, BoundedTensor, PerturbationLpNorm

from lirpa_deq.testing import assert_sound

METHODS = ["IBP", "CROWN", "CROWN-IBP", "CROWN-Optimized"]


class Residual(nn.Module):
    def __init__(self, n=12):
        super().__init__()
        self.inp, self.a, self.b, self.out = nn.Linear(16, n), nn.Linear(n, n), nn.Linear(n, n), nn.Linear(n, 5)

    def forward(self, x):
        h = torch.relu(self.inp(x.flatten(1)))
        h = h + torch.relu(self.b(torch.relu(self.a(h))))
        return self.out(h)


def mlp():
    return nn.Sequential(nn.Flatten(), nn.Linear(16, 20), nn.ReLU(), nn.Linear(20, 20), nn.ReLU(), nn.Linear(20, 5))


def cnn_bn_avgpool():
    # AvgPool4 on a non-tiling map after convs is DEQ-3's head; it needs the avgpool_view shim
    return nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.AvgPool2d(4),
                         nn.Flatten(), nn.Linear(4 * 2 * 2, 5))


def cnn_maxpool():
    return nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Conv2d(4, 4, 3, padding=1),
                         nn.ReLU(), nn.Flatten(), nn.Linear(4 * 4 * 4, 5))


class ReluAffineUnrolled(nn.Module):
    """z = relu(W z + U x) unrolled 3 times: the Add of two 2-D tensors needs add_sub_patches_mode."""

    def __init__(self, n=10):
        super().__init__()
        self.U, self.W, self.out = nn.Linear(16, n), nn.Linear(n, n, bias=False), nn.Linear(n, 5)

    def forward(self, x):
        u = self.U(x.flatten(1))
        z = torch.relu(u)
        for _ in range(3):
            z = torch.relu(self.W(z) + u)
        return self.out(z)


MODELS = {"mlp": mlp, "residual": Residual, "cnn_bn_avgpool": cnn_bn_avgpool, "cnn_maxpool": cnn_maxpool,
          "relu_affine": ReluAffineUnrolled}


def _prepare(name, batch=3):
    torch.manual_seed(1)
    model = MODELS[name]()
    x = torch.rand(batch, 1, 8, 8) if name.startswith("cnn") else torch.rand(batch, 1, 4, 4)
    if name.startswith("cnn"):
        model.train()
        model(torch.rand(64, *x.shape[1:]))  # give BatchNorm non-trivial running statistics
    model.eval()
    opts = {"conv_mode": "matrix"} if name == "cnn_maxpool" else {}  # 0.3: MaxPool alpha needs matrix mode
    return model, x, BoundedModule(model, torch.zeros_like(x), bound_opts=opts)


@pytest.mark.parametrize("name", sorted(MODELS))
@pytest.mark.parametrize("method", METHODS)
def test_bounds_are_sound(name, method):
    model, x, bounded = _prepare(name)
    eps = 0.05
    bx = BoundedTensor(x, PerturbationLpNorm(norm=math.inf, eps=eps))
    lb, ub = bounded.compute_bounds(x=(bx,), method=method)
    assert lb.shape == ub.shape == (3, 5)
    assert torch.all(lb <= ub)
    assert_sound(model, x, eps, lb, ub, n_samples=200, pgd_steps=20)


@pytest.mark.parametrize("name", sorted(MODELS))
def test_crown_at_least_as_tight_as_ibp_on_average(name):
    model, x, bounded = _prepare(name)
    bx = BoundedTensor(x, PerturbationLpNorm(norm=math.inf, eps=0.05))
    widths = {}
    for method in ("IBP", "CROWN"):
        lb, ub = bounded.compute_bounds(x=(bx,), method=method)
        widths[method] = (ub - lb).mean().item()
    assert widths["CROWN"] <= widths["IBP"] + 1e-6, widths


def test_margin_specification_C_and_return_A():
    model, x, bounded = _prepare("mlp")
    labels = torch.tensor([0, 1, 2])
    # C rows: logit[y] - logit[j] for j != y  (the certification margins)
    eye = torch.eye(5)
    C = torch.stack([eye[y].unsqueeze(0) - eye[[j for j in range(5) if j != y]] for y in labels])
    eps = 0.03
    bx = BoundedTensor(x, PerturbationLpNorm(norm=math.inf, eps=eps))
    final = bounded.final_name
    input_name = bounded.input_name[0]
    lb, ub, A = bounded.compute_bounds(x=(bx,), C=C, method="CROWN", return_A=True,
                                       needed_A_dict={final: [input_name]})
    assert lb.shape == (3, 4)

    def margins(z):  # z stacks copies of the batch: (copies * 3, ...)
        return torch.einsum("bkc,bc->bk", C.repeat(z.shape[0] // 3, 1, 1), model(z))

    assert_sound(margins, x, eps, lb, ub, n_samples=200)
    # the returned linear bound reconstructs the numeric bound: lA x0 - eps ||lA||_1 + lbias
    entry = A[final][input_name]
    lA, lbias = entry["lA"], entry["lbias"]
    recon = (lA.flatten(2) @ x.flatten(1).unsqueeze(-1)).squeeze(-1) - eps * lA.flatten(2).abs().sum(-1) + lbias
    torch.testing.assert_close(recon, lb, atol=1e-5, rtol=1e-5)


def test_bounded_parameter_perturbs_weights():
    torch.manual_seed(2)
    lin = nn.Linear(4, 3)
    model = nn.Sequential(lin, nn.ReLU(), nn.Linear(3, 2))
    x = torch.rand(2, 4)
    weight = lin.weight.detach().clone()
    eps = 0.01
    lin.weight = BoundedParameter(weight, PerturbationLpNorm(norm=math.inf, eps=eps))
    bounded = BoundedModule(model, x)
    lb, ub = bounded.compute_bounds(x=(x,), method="IBP")
    lin.weight = nn.Parameter(weight)
    for _ in range(200):
        lin.weight.data = weight + (torch.rand_like(weight) * 2 - 1) * eps
        y = model(x)
        assert torch.all(y >= lb - 1e-6) and torch.all(y <= ub + 1e-6)


def test_crown_ibp_loss_backward_updates_parameters():
    model, x, bounded = _prepare("cnn_bn_avgpool")
    bounded.train()
    labels = torch.tensor([0, 1, 2])
    bx = BoundedTensor(x, PerturbationLpNorm(norm=math.inf, eps=0.02))
    params = [p for p in bounded.parameters() if p.requires_grad]
    assert params, "BoundedModule exposes no trainable parameters"
    before = [p.detach().clone() for p in params]
    opt = torch.optim.SGD(params, lr=0.1)
    lb, ub = bounded.compute_bounds(x=(bx,), method="CROWN-IBP")
    loss = nn.functional.cross_entropy(-lb + ub.gather(1, labels.view(-1, 1)), labels)  # a bound-based loss
    loss.backward()
    opt.step()
    changed = sum(not torch.equal(a, p.detach()) for a, p in zip(before, params))
    assert changed >= len(params) // 2
    # the optimised parameters are the model's own (training the BoundedModule trains the model)
    assert any(p is q for p in params for q in model.parameters())
