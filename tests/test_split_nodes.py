"""What upstream auto_LiRPA's branch and bound can split on a model with a DEQ: the ReLUs outside
the DEQ only (the DEQ is one node; the ReLUs of its cell are not graph nodes). docs/lipschitz.md,
"Branch and bound", says what a split inside the DEQ would need."""
import math

import pytest
import torch
import torch.nn as nn
from auto_LiRPA import BoundedModule, BoundedTensor, PerturbationLpNorm

from lirpa_deq import BoundDEQ
from lirpa_deq.nn import DEQ, IBPMonLinear

pytestmark = pytest.mark.skipif(not hasattr(BoundedModule, "get_split_nodes"),
                                reason="this auto_LiRPA has no branch-and-bound entry points (get_split_nodes: "
                                       "upstream)")


def test_split_nodes_are_the_relus_outside_the_deq():
    model = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 8), DEQ(IBPMonLinear(8)), nn.Linear(8, 8),
                          nn.ReLU(), nn.Linear(8, 3))
    x = torch.rand(2, 6)
    bounded = BoundedModule(model, x)
    bounded.compute_bounds(x=(BoundedTensor(x, PerturbationLpNorm(norm=math.inf, eps=0.1)),), method="CROWN")
    split_nodes, activations = bounded.get_split_nodes()
    relus = [node for node in bounded.modules() if type(node).__name__ == "BoundRelu"]
    assert len(relus) == 2 and len(split_nodes) == 2  # the two explicit ReLUs; the DEQ's 8 neurons: none
    assert sorted(act.name for acts in activations.values() for act, _ in acts) == sorted(r.name for r in relus)
    assert not any(isinstance(node, BoundDEQ) for node in split_nodes)
