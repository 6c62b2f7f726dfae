"""State-shape validation shared by the fc and conv cells."""
from __future__ import annotations


def validate_fc(cell, shape):
    if len(shape) != 2 or shape[-1] != cell.n:
        raise ValueError(f"{type(cell).__name__}({cell.n}) needs states of shape (B, {cell.n}), "
                         f"got {tuple(shape)}")


def validate_conv(cell, shape):
    if len(shape) != 4 or shape[1] != cell.channels:
        raise ValueError(f"{type(cell).__name__}({cell.channels}) needs states of shape "
                         f"(B, {cell.channels}, H, W), got {tuple(shape)}")


def conv_check_shape(cell, shape):
    """Default small image for dense checks of conv cells, or the validated given one."""
    if shape is None:
        return (cell.channels, 6, 6)
    shape = tuple(int(s) for s in shape)
    if len(shape) != 3 or shape[0] != cell.channels:
        raise ValueError(f"check(shape=...) needs (C, H, W) with C={cell.channels}, got {shape}")
    return shape
