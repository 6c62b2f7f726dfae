"""Linear (CROWN) bounds through the DEQ node by an adjoint DEQ -- not implemented yet."""


def deq_bound_backward(node, last_lA, last_uA, *x, **kwargs):
    raise NotImplementedError(
        "backward (CROWN) bounds through a DEQ node are not implemented yet; use method='IBP' "
        "for models whose last DEQ layer is followed by linear layers only, or fold the final "
        "Linear into C with method='IBP'.")
