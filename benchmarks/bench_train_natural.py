#!/usr/bin/env python
"""Benchmark: natural training of small DEQs on the embedded MNIST-5k (4,000 train / 1,000 test).

Trains, in one run on 1 CPU thread, (a) Flatten -> Linear(784, 256) -> DEQ(IBPMonLinear(256)) ->
Linear (model 'fc-deq') and (b) the demo's conv front end + the same DEQ ('conv-fc-deq'), then
reports clean test accuracy and CPU time of training. Target of the layers issue: >= 95% in under
3 CPU minutes.

    python benchmarks/bench_train_natural.py
"""
import tempfile
import time

import torch

import lirpa_deq  # noqa: F401
from lirpa_deq.cli import main as cli


def run(model, extra):
    with tempfile.TemporaryDirectory() as out:
        t0 = time.process_time()
        cli(["train", "--model", model, "--method", "natural", "--out", out, "--no-progress", *extra])
        cpu = time.process_time() - t0
        from lirpa_deq.data import load_mnist5k
        from lirpa_deq.training.checkpoint import load_checkpoint, model_from_checkpoint

        net = model_from_checkpoint(load_checkpoint(f"{out}/checkpoint.pt")).eval()
        x, y = load_mnist5k("test").tensors
        with torch.no_grad():
            acc = (net(x).argmax(1) == y).float().mean().item()
    print(f"RESULT {model:<12} clean test accuracy {100 * acc:5.1f}%   training CPU time {cpu:6.1f} s")


if __name__ == "__main__":
    torch.set_num_threads(1)
    run("fc-deq", ["--width", "256", "--epochs", "20", "--lr", "1e-3", "--lr-milestones", "15"])
    run("conv-fc-deq", ["--epochs", "10", "--lr", "1e-3"])
