"""What every example shares: the common command-line flags, seeding / device set-up, evenly spaced
subsets and a plain training loop. (Not an example itself: tests skip files starting with '_'.)"""
import argparse

import torch
import torch.nn as nn


def example_parser(doc):
    """An ArgumentParser with the flags every example takes: --quick, --dataset, --data-root,
    --device, --threads, --seed (each script adds its own)."""
    p = argparse.ArgumentParser(description=doc.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="small, fast run on the embedded MNIST digits")
    p.add_argument("--dataset", default=None,
                   help="mnist5k (embedded, default), digits, mnist or cifar10 (the last two need --data-root)")
    p.add_argument("--data-root", default=None, help="directory holding MNIST / CIFAR-10 files (never downloads)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1)")
    p.add_argument("--seed", type=int, default=0)
    return p


def add_training_args(p, quick_epochs, quick_tests):
    """The flags of the certified-training examples (train_ibp_mondeq.py, train_crown_ibp_deq.py)."""
    p.add_argument("--model", default="conv-fc-deq", help="lirpa_deq.models registry name (default conv-fc-deq)")
    p.add_argument("--width", type=int, default=None, help="DEQ width (default 64 quick / 256)")
    p.add_argument("--eps-train", type=float, default=0.2, help="final training eps, l_inf (default 0.2)")
    p.add_argument("--eps", type=float, nargs="+", default=[0.05, 0.1], help="test eps (default 0.05 0.1)")
    p.add_argument("--epochs", type=float, default=None, help=f"epochs (default {quick_epochs} quick / 30)")
    p.add_argument("--num-test", type=int, default=None,
                   help=f"evenly spaced test images (default {quick_tests} quick / all)")
    p.add_argument("--save", default=None, metavar="PATH", help="write the trained checkpoint here")
    return p


def parse_common(parser, argv=None):
    """Parse; without --dataset: the embedded digits, or MNIST when --data-root points at files."""
    args = parser.parse_args(argv)
    if args.dataset is None:
        args.dataset = "mnist" if args.data_root else "mnist5k"
    return args


def setup(args):
    """Threads and seed from the flags; returns the torch device."""
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    return torch.device(args.device)


def evenly_spaced(dataset, num):
    """``num`` evenly spaced (x, y) of a dataset (the embedded splits are sorted by class)."""
    x, y = dataset.tensors
    idx = torch.linspace(0, len(y) - 1, min(num, len(y))).round().long()
    return x[idx], y[idx]


def train_naturally(model, train, epochs, device, seed, lr=2e-3, batch_size=128, noise=0.0, limit=None):
    """Cross-entropy training with Adam (DEQ layers have implicit gradients). ``noise``: Gaussian
    data augmentation of that standard deviation (randomized smoothing); ``limit``: train on a
    random subset of that size. Returns the model in eval mode."""
    x, y = train.tensors
    g = torch.Generator().manual_seed(seed)
    if limit:  # a random subset (the embedded splits are sorted by class)
        keep = torch.randperm(len(y), generator=g)[:limit]
        x, y = x[keep], y[keep]
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    model.train()
    for epoch in range(epochs):
        perm = torch.randperm(len(y), generator=g)
        for i in range(0, len(y), batch_size):
            idx = perm[i:i + batch_size]
            xb = x[idx] + noise * torch.randn(x[idx].shape, generator=g) if noise else x[idx]
            loss = nn.functional.cross_entropy(model(xb.to(device)), y[idx].to(device))
            opt.zero_grad()
            loss.backward()
            opt.step()
        print(f"  epoch {epoch + 1}/{epochs}: last batch loss {loss.item():.3f}")
    return model.eval()
