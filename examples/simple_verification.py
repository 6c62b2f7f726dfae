#!/usr/bin/env python
"""Simple verification of a Deep Equilibrium Model with auto_LiRPA (IBP and CROWN).

The DEQ analogue of auto_LiRPA's ``examples/vision/simple_verification.py``:

1. build a small DEQ classifier  Flatten -> Linear -> DEQ(IBPMonLinear) -> Linear  (or load one
   trained by ``lirpa-deq train`` / ``examples/train_ibp_mondeq.py --save``),
2. train it briefly (natural training: a DEQ is an ordinary ``nn.Module``),
3. wrap it with ``BoundedModule`` -- ``import lirpa_deq`` has registered the DEQ layer as ONE
   auto_LiRPA node, so nothing else is needed,
4. print IBP and CROWN lower/upper bounds of every logit over an l_inf ball for a few test images,
   and whether each image is certified (lower bound of every margin f_y - f_j is > 0).

The bounds are SOUND for the true fixed point of the DEQ (proved interval fixed point for IBP,
adjoint DEQ for CROWN; see docs/ibp.md and docs/crown.md).

    python examples/simple_verification.py --quick          # embedded MNIST digits, ~10 s on 1 CPU thread
    python examples/simple_verification.py --eps 0.02 --num-images 5
    python examples/simple_verification.py --data-root ~/data --dataset mnist
    python examples/simple_verification.py --load runs/ibp/checkpoint.pt
"""
import math
import time

import torch
import torch.nn as nn

import lirpa_deq  # noqa: F401  (registers the DEQ operator with auto_LiRPA; import it first)
from auto_LiRPA import BoundedModule, BoundedTensor, PerturbationLpNorm
from lirpa_deq.data import dataset_info, get_dataset
from lirpa_deq.nn import DEQ, IBPMonLinear
from lirpa_deq.training import load_checkpoint, margin_spec, model_from_checkpoint
from _common import evenly_spaced, example_parser, parse_common, setup, train_naturally


def parse_args(argv=None):
    p = example_parser(__doc__)
    p.add_argument("--load", default=None, metavar="CHECKPOINT", help="checkpoint to verify instead of training")
    p.add_argument("--eps", type=float, default=0.01, help="l_inf radius in [0, 1] pixel units (default 0.01)")
    p.add_argument("--num-images", type=int, default=None, help="test images to verify (default 3 quick / 10)")
    p.add_argument("--epochs", type=int, default=None, help="training epochs (default 2 quick / 5)")
    p.add_argument("--width", type=int, default=64, help="DEQ width (default 64)")
    args = parse_common(p, argv)
    args.num_images = args.num_images or (3 if args.quick else 10)
    args.epochs = args.epochs or (2 if args.quick else 5)
    return args


def main(argv=None):
    args = parse_args(argv)
    device = setup(args)
    info = dataset_info(args.dataset)  # input_shape (C, H, W), num_classes
    test = get_dataset(args.dataset, "test", args.data_root)

    # ---- 1. the model: load a checkpoint, or build and train a small DEQ -------------------------
    if args.load:
        model = model_from_checkpoint(load_checkpoint(args.load, map_location=device), device)
        print(f"loaded {args.load}")
    else:
        d = math.prod(info.input_shape)
        # DEQ(cell): z* = relu(W z* + u) with u = Linear(x). IBPMonLinear's W is parameterised so
        # that the fixed point is unique AND the interval fixed point can be proved (docs/layers.md).
        model = nn.Sequential(nn.Flatten(), nn.Linear(d, args.width), DEQ(IBPMonLinear(args.width)),
                              nn.Linear(args.width, info.num_classes)).to(device)
        train = get_dataset(args.dataset, "train", args.data_root)
        if args.quick:  # at most 4,000 evenly spaced training images (all of the embedded split)
            train = torch.utils.data.TensorDataset(*evenly_spaced(train, 4000))
        print(f"training {model} on {len(train)} {args.dataset} images for {args.epochs} epochs")
        t0 = time.time()
        train_naturally(model, train, args.epochs, device, args.seed)
        print(f"  trained in {time.time() - t0:.1f} s")
    model.eval()

    # ---- 2. wrap with auto_LiRPA ----------------------------------------------------------------
    x, y = evenly_spaced(test, args.num_images)
    x, y = x.to(device), y.to(device)
    bounded = BoundedModule(model, torch.zeros_like(x[:1]), device=str(device))
    pred = bounded(x).argmax(1)

    # The l_inf ball of radius eps, intersected with the valid pixel range [0, 1].
    ptb = PerturbationLpNorm(norm=math.inf, eps=args.eps, x_L=(x - args.eps).clamp(0, 1),
                             x_U=(x + args.eps).clamp(0, 1))
    bx = BoundedTensor(x, ptb)

    # ---- 3. bounds on every logit ---------------------------------------------------------------
    print(f"\nBounds of the logits over the l_inf ball eps={args.eps} ({args.dataset}, {len(y)} test images)")
    for method in ("IBP", "CROWN"):
        t0 = time.time()
        lb, ub = bounded.compute_bounds(x=(bx,), method=method)
        print(f"\n{method} ({(time.time() - t0) * 1000:.0f} ms for the batch)")
        for i in range(len(y)):
            print(f"image {i} (label {int(y[i])}, prediction {int(pred[i])})")
            for j in range(info.num_classes):
                mark = "  (ground truth)" if j == int(y[i]) else ""
                print(f"  f_{j}(x_{i}): {lb[i, j].item():8.3f} <= f_{j}(x_{i}+delta) <= {ub[i, j].item():8.3f}{mark}")

    # ---- 4. certification: bound the margins f_y - f_j directly (tighter than logit bounds) ------
    # C has rows e_y - e_j (j != y), shape (B, K-1, K); certified iff every margin lower bound > 0.
    C = margin_spec(y, info.num_classes)
    rows = {}
    for method in ("IBP", "CROWN"):
        lb, _ = bounded.compute_bounds(x=(bx,), C=C, method=method, bound_upper=False)
        rows[method] = lb.min(1).values  # the worst margin's lower bound per image
    # Both bounds are sound, so their maximum is too (never certifies fewer than IBP alone).
    best = torch.maximum(rows["IBP"], rows["CROWN"])

    print(f"\nCertification at l_inf eps={args.eps} (margin lower bound = min_j lower bound of f_y - f_j)")
    print(f"{'image':>5} {'label':>5} {'pred':>5} {'IBP margin lb':>14} {'CROWN margin lb':>16}  result")
    for i in range(len(y)):
        ok = bool(pred[i] == y[i]) and best[i].item() > 0
        print(f"{i:>5} {int(y[i]):>5} {int(pred[i]):>5} {rows['IBP'][i].item():14.4f} "
              f"{rows['CROWN'][i].item():16.4f}  {'certified' if ok else 'not certified'}")
    n_ibp = int((rows["IBP"] > 0).sum())
    n_crown = int((best > 0).sum())
    print(f"certified IBP: {n_ibp}/{len(y)} ({100 * n_ibp / len(y):.1f}%), "
          f"certified CROWN: {n_crown}/{len(y)} ({100 * n_crown / len(y):.1f}%), "
          f"clean accuracy: {100 * float((pred == y).float().mean()):.1f}%")


if __name__ == "__main__":
    main()
