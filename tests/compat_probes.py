"""Probes run in a fresh interpreter by tests/test_compat.py: each exercises the code path that one
shim of lirpa_deq._compat exists for. Usage: python compat_probes.py PROBE_NAME [PROBE_NAME ...]
(exit 0 when every named probe succeeds)."""
import math
import sys

import torch
import torch.nn as nn


def _bounds(model, x, method, eps=0.05, **opts):
    from auto_LiRPA import BoundedModule, BoundedTensor, PerturbationLpNorm

    bounded = BoundedModule(model, torch.zeros_like(x), bound_opts=opts)
    bx = BoundedTensor(x, PerturbationLpNorm(norm=math.inf, eps=eps))
    return bounded, bounded.compute_bounds(x=(bx,), method=method)


class ReluAffine(nn.Module):
    def __init__(self):
        super().__init__()
        self.U, self.W, self.out = nn.Linear(16, 10), nn.Linear(10, 10, bias=False), nn.Linear(10, 5)

    def forward(self, x):
        u = self.U(x)
        z = torch.relu(u)
        for _ in range(3):
            z = torch.relu(self.W(z) + u)
        return self.out(z)


def probe_import():
    import lirpa_deq  # noqa: F401


def probe_bounded_module():
    import lirpa_deq  # noqa: F401
    _bounds(nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2)), torch.rand(2, 4), "IBP")


def probe_parameters():
    import lirpa_deq  # noqa: F401
    bounded, _ = _bounds(nn.Sequential(nn.Linear(4, 3)), torch.rand(2, 4), "IBP")
    assert len(list(bounded.parameters())) == 2


def probe_pad():
    import lirpa_deq  # noqa: F401
    model = nn.Sequential(nn.ZeroPad2d(1), nn.Conv2d(1, 2, 3), nn.ReLU(), nn.Flatten(), nn.Linear(2 * 8 * 8, 3))
    _bounds(model, torch.rand(2, 1, 8, 8), "CROWN")


def probe_relu_affine_crown():
    import lirpa_deq  # noqa: F401
    _bounds(ReluAffine(), torch.rand(3, 16), "CROWN")


def probe_relu_affine_sound():
    import lirpa_deq  # noqa: F401
    from lirpa_deq.testing import check_bounds

    torch.manual_seed(1)
    model, x = ReluAffine(), torch.rand(3, 16)
    _, (lb, ub) = _bounds(model, x, "CROWN", conv_mode="matrix")  # matrix mode: no add_sub shim needed
    report = check_bounds(model, x, 0.05, lb, ub, n_samples=300)
    assert report.violations == 0, report


class Residual(nn.Module):
    def __init__(self, n=12):
        super().__init__()
        self.inp, self.a, self.b, self.out = nn.Linear(16, n), nn.Linear(n, n), nn.Linear(n, n), nn.Linear(n, 5)

    def forward(self, x):
        h = torch.relu(self.inp(x))
        return self.out(h + torch.relu(self.b(torch.relu(self.a(h)))))


def probe_alpha_no_unstable():
    """alpha-CROWN where a start node has no unstable neuron at first (seeded: it gets some later)."""
    import lirpa_deq  # noqa: F401
    torch.manual_seed(1)
    model, x = Residual(), torch.rand(3, 16)
    _bounds(model, x, "CROWN-Optimized")


def probe_maxpool_alpha():
    import lirpa_deq  # noqa: F401
    model = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Conv2d(4, 4, 3, padding=1),
                          nn.ReLU(), nn.Flatten(), nn.Linear(64, 5))
    _bounds(model, torch.rand(2, 1, 8, 8), "CROWN-Optimized", conv_mode="matrix")


def probe_avgpool4():
    import lirpa_deq  # noqa: F401
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.AvgPool2d(4), nn.Conv2d(4, 4, 3, padding=1),
                          nn.ReLU(), nn.Flatten(), nn.Linear(16, 5))
    # dense intermediate specifications: every ReLU's pass goes back through the AvgPool (with sparse
    # ones a pass with no unstable neuron is skipped, and whether one is depends on the weights)
    _bounds(model, torch.rand(2, 1, 8, 8), "CROWN", sparse_intermediate_bounds=False)


def probe_tanh_float64():
    import lirpa_deq  # noqa: F401
    torch.manual_seed(0)  # wide enough to have tanh neurons on both sides of 0 (the table path)
    model = nn.Sequential(nn.Linear(4, 32), nn.Tanh(), nn.Linear(32, 3)).double()
    _bounds(model, torch.rand(8, 4, dtype=torch.float64), "CROWN")


def probe_conv_matrix_float64():
    import lirpa_deq  # noqa: F401
    torch.manual_seed(0)  # eps 0.5: unstable neurons, so intermediate specifications are built
    model = nn.Sequential(nn.Conv2d(1, 2, 3), nn.ReLU(), nn.Conv2d(2, 2, 3), nn.ReLU(), nn.Flatten(),
                          nn.Linear(32, 3)).double()
    _bounds(model, torch.rand(2, 1, 8, 8, dtype=torch.float64), "CROWN", eps=0.5, conv_mode="matrix")


def probe_optimized_float64():
    import lirpa_deq  # noqa: F401
    model = nn.Sequential(nn.Linear(6, 12), nn.ReLU(), nn.Linear(12, 3)).double()
    _, (lb, _) = _bounds(model, torch.rand(1, 6, dtype=torch.float64), "CROWN-Optimized",
                         optimize_bound_args={"iteration": 3})
    assert lb.dtype == torch.float64, lb.dtype


def probe_jacobian_float64():
    import lirpa_deq  # noqa: F401
    from auto_LiRPA import BoundedModule, BoundedTensor, PerturbationLpNorm
    from auto_LiRPA.operators import BoundJacobianInit  # noqa: F401  (0.3 has no Jacobian graph: ImportError)
    from auto_LiRPA.bound_ops import JacobianOP

    class JacobianOf(nn.Module):
        def __init__(self):
            super().__init__()
            self.net = nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 2))

        def forward(self, x):
            return JacobianOP.apply(self.net(x), x)

    x = torch.rand(1, 4, dtype=torch.float64)
    bounded = BoundedModule(JacobianOf().double(), x)
    lb, ub = bounded.compute_jacobian_bounds(BoundedTensor(x, PerturbationLpNorm(norm=math.inf, eps=0.05)),
                                             optimize=False)
    assert lb.dtype == torch.float64 and bool((lb <= ub).all())


# which probe proves each shim necessary
SHIM_PROBES = {
    "numpy_arraysetops": "import",
    "set_opset_version": "import",
    "node_getitem": "bounded_module",
    "symbolic_registration": "pad",
    "named_members_remove_duplicate": "parameters",
    "add_sub_patches_mode": "relu_affine_crown",
    "dense_specs_on_add_nodes": "relu_affine_sound",
    "sparse_alpha_no_unstable": "alpha_no_unstable",
    "maxpool_alpha_spec": "maxpool_alpha",
    "avgpool_view": "avgpool4",
    "sigmoid_table_dtype": "tanh_float64",
    "sparse_c_dtype": "conv_matrix_float64",
    "optimized_bounds_dtype": "optimized_float64",
    "jacobian_dtype": "jacobian_float64",
}

# probes of code paths that only some auto_LiRPA versions have: probe -> BoundedModule attribute
PROBE_NEEDS = {"jacobian_float64": "compute_jacobian_bounds"}

if __name__ == "__main__":
    for name in sys.argv[1:]:
        globals()["probe_" + name]()
    print("ok")
