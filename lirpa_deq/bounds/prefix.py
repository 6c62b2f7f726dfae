"""Concretize a linear function of the DEQ's injection u over the INPUT region, through the affine
layers before the DEQ (the DEQ's counterpart of CROWN concretizing intermediate bounds at the
input rather than at the previous layer's box).

When every auto_LiRPA node between the perturbed input x and u is affine with one perturbed input
(Linear / Conv / BatchNorm in eval mode with fixed weights, Flatten / Reshape, Add / Sub of a
constant, average pooling), u = P x + q exactly, and

    min over x in X of <a, u(x)> = min over x in X of <P^T a, x> + <a, q>

is what the input's perturbation concretizes (the dual norm for l_p balls, the box for l_inf with
clipping). Each node's own ``bound_backward`` maps a to P^T a (exact on affine nodes: no
relaxation); where the chain meets anything else (a ReLU, a second perturbed input) there is no
prefix and callers concretize over the box of u instead (always sound, looser).
"""
from __future__ import annotations

import torch

from .._compat import bound_classes

_AFFINE = set(bound_classes("BoundLinear", "BoundConv", "BoundFlatten", "BoundReshape", "BoundAdd", "BoundSub",
                            "BoundBatchNormalization", "BoundAveragePool", "BoundUnsqueeze", "BoundSqueeze"))
_WEIGHTED = set(bound_classes("BoundLinear", "BoundConv", "BoundBatchNormalization"))
_INPUTS = set(bound_classes("BoundInput"))


def affine_prefix(u_node):
    """(chain, root): the affine nodes from u back to the perturbed input root (u first), or None."""
    chain, node = [], u_node
    for _ in range(64):
        if type(node) in _INPUTS:
            return (chain, node) if getattr(node, "perturbation", None) is not None else None
        if type(node) not in _AFFINE or getattr(node, "training", False) and "Batch" in type(node).__name__:
            return None
        perturbed = [i for i, inp in enumerate(node.inputs) if getattr(inp, "perturbed", False)]
        if len(perturbed) != 1 or (type(node) in _WEIGHTED and perturbed[0] != 0):
            return None
        chain.append((node, perturbed[0]))
        node = node.inputs[perturbed[0]]
    return None


def concretize_lower(prefix, A):
    """Lower bound over the input region of <A_k, u> for each row: A (K, B, *u_state) -> (K, B), or
    None when a node of the chain cannot map A back (then use the box of u)."""
    chain, root = prefix
    bias = torch.zeros(A.shape[:2], dtype=A.dtype, device=A.device)
    try:
        for node, i in chain:
            As, lbias, _ = node.bound_backward(A, None, *node.inputs)
            A = As[i][0]
            if isinstance(lbias, torch.Tensor):
                bias = bias + lbias.reshape(bias.shape)
            for j, (lA, _) in enumerate(As):
                if j != i and lA is not None:  # a constant input's contribution (e.g. Add of a constant)
                    value = getattr(node.inputs[j], "forward_value", None)
                    if value is None:
                        return None
                    bias = bias + node.inputs[j].get_bias(lA, value).reshape(bias.shape)
            if not isinstance(A, torch.Tensor):
                return None
        K, B = A.shape[:2]
        value = root.perturbation.concretize(root.center, A.reshape(K, B, -1).transpose(0, 1), sign=-1, aux=root.aux)
    except (NotImplementedError, AttributeError, RuntimeError, TypeError, AssertionError):
        return None
    return value.reshape(B, K).transpose(0, 1) + bias
