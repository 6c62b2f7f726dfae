#!/usr/bin/env python
"""Global and local Lipschitz bounds of a DEQ classifier, and Lipschitz certificates.

For each test image x and each margin f_y - f_j (j != y), ``lirpa_deq.lipschitz.local_lipschitz``
bounds the Lipschitz constant over the ball ||x' - x|| <= eps, i.e. sup ||grad_x' (f_y - f_j)(x')||
in the dual norm (l1 for an l_inf ball):

* ``global``      closed form, valid for ALL inputs (product of layer norms; for the DEQ
                  ``1 / (1 - ||W||)`` or the monotone bound cond(S) / m);
* ``elementwise`` interval bounds on |gradients| over the ball (a proved Neumann series);
* ``local``       bound propagation on the Jacobian with exact refinement over relu' patterns.

All three are SOUND upper bounds (docs/lipschitz.md). The gradient norm at x itself is a true
LOWER bound of the local constant, so ``bound / grad-at-x`` >= 1 measures the tightness.
``certify_lipschitz`` then certifies f_y - f_j > 0 on the ball from a sound lower bound of the
margin at x minus eps times the bound. An IBP certificate of the same images is shown for context.

    python examples/lipschitz.py --quick                 # embedded MNIST digits, ~10 s on 1 CPU thread
    python examples/lipschitz.py --num-images 20 --eps 0.01
    python examples/lipschitz.py --norm 2 --eps 0.1      # l2 ball
    python examples/lipschitz.py --load runs/ibp/checkpoint.pt
"""
import math
import time
import warnings

import torch

import lirpa_deq  # noqa: F401  (registers the DEQ operator with auto_LiRPA)
from lirpa_deq.data import dataset_info, get_dataset
from lirpa_deq.lipschitz import LipschitzFallbackWarning, certify_lipschitz, local_lipschitz
from lirpa_deq.models import build_model
from lirpa_deq.training import certify_bounds, load_checkpoint, margin_spec, model_from_checkpoint
from _common import evenly_spaced, example_parser, parse_common, setup, train_naturally


def parse_args(argv=None):
    p = example_parser(__doc__)
    p.add_argument("--load", default=None, metavar="CHECKPOINT", help="checkpoint to analyse instead of training")
    p.add_argument("--eps", type=float, default=0.01, help="radius of the ball (default 0.01)")
    p.add_argument("--norm", default="inf", choices=["inf", "2"], help="l_inf (default) or l2 ball")
    p.add_argument("--num-images", type=int, default=None, help="test images (default 10 quick / 20)")
    p.add_argument("--width", type=int, default=None, help="DEQ width of the fc-deq (default 64 quick / 128)")
    p.add_argument("--epochs", type=int, default=3, help="natural training epochs (default 3)")
    args = parse_common(p, argv)
    args.norm = math.inf if args.norm == "inf" else 2
    args.num_images = args.num_images or (10 if args.quick else 20)
    args.width = args.width or (64 if args.quick else 128)
    return args


def gradient_norm_at_x(model, x, C, norm):
    """||grad_x (C_k . f)(x)||_dual per (image, row): a LOWER bound of the local Lipschitz constant."""
    dual = 1 if norm == math.inf else 2
    out = torch.zeros(C.shape[:2], dtype=x.dtype, device=x.device)
    for k in range(C.shape[1]):
        xr = x.clone().requires_grad_(True)
        (g,) = torch.autograd.grad((model(xr) * C[:, k]).sum(), xr)
        out[:, k] = g.flatten(1).norm(p=dual, dim=1)
    return out


def main(argv=None):
    args = parse_args(argv)
    device = setup(args)
    info = dataset_info(args.dataset)

    # ---- model: Flatten -> Linear -> DEQ(IBPMonLinear) -> Linear, trained briefly (or loaded) ----
    if args.load:
        model = model_from_checkpoint(load_checkpoint(args.load, map_location=device), device)
    else:
        model = build_model("fc-deq", info.input_shape, info.num_classes, width=args.width).to(device)
        train = get_dataset(args.dataset, "train", args.data_root)
        print(f"natural training of fc-deq (width {args.width}) on {len(train)} {args.dataset} images")
        train_naturally(model, train, args.epochs, device, args.seed, lr=1e-3, batch_size=100)
    model.eval()

    x, y = evenly_spaced(get_dataset(args.dataset, "test", args.data_root), args.num_images)
    x, y = x.to(device), y.to(device)
    ibp_cert = None
    if args.norm == math.inf:  # IBP certificate of the float32 model, for context
        ibp_cert, _ = certify_bounds(model, x, y, args.eps, "IBP", num_classes=info.num_classes, clip=None)

    # The analysis runs in float64 (tighter rounding margins), as benchmarks/bench_lipschitz.py does.
    model, x = model.double(), x.double()
    C = margin_spec(y, info.num_classes).to(x)  # rows e_y - e_j: the margins f_y - f_j
    lower = gradient_norm_at_x(model, x, C, args.norm)

    # ---- bounds and certificates per method -----------------------------------------------------
    norm_name = "l_inf" if args.norm == math.inf else "l2"
    print(f"\nLipschitz bounds of the {C.shape[1]} margins f_y - f_j of {len(y)} {args.dataset} test images "
          f"over the {norm_name} ball eps={args.eps} (dual norm of the gradient)")
    print(f"{'method':26}{'median bound':>13}{'bound / grad-at-x':>19}{'certified':>11}{'ms/image':>10}")
    print(f"{'gradient at x (lower)':26}{lower.median().item():13.3f}{1.0:19.2f}")
    for method in ("global", "elementwise", "local"):
        t0 = time.time()
        with warnings.catch_warnings():
            # a fallback to a cheaper (still sound) bound is reported, not an error
            warnings.simplefilter("ignore", LipschitzFallbackWarning)
            bound = local_lipschitz(model, x, args.eps, norm=args.norm, method=method, C=C)
            cert, _ = certify_lipschitz(model, x, y, args.eps, norm=args.norm, method=method)
        ms = 1000 * (time.time() - t0) / len(y)
        ratio = (bound / lower.clamp_min(1e-12)).median().item()
        n = int(cert.sum())
        print(f"{method:26}{bound.median().item():13.3f}{ratio:19.2f}{f'{n}/{len(y)}':>11}{ms:10.1f}")
    if ibp_cert is not None:
        print(f"{'IBP (for comparison)':26}{'':>13}{'':>19}{f'{int(ibp_cert.sum())}/{len(y)}':>11}")
    print("(bound: median over images and margins; ms/image: the bound plus the certificate)")


if __name__ == "__main__":
    main()
