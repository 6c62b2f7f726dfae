#!/usr/bin/env python
"""Randomized smoothing of a DEQ: plain (Cohen et al.) vs Serialized RS (SRS), certified l2 radii.

1. Train a small fc IBP-MonDEQ with Gaussian noise augmentation (the base classifier).
2. For each test image, certify the SMOOTHED classifier g(x) = argmax_c P(f(x + d) = c),
   d ~ N(0, sigma^2 I), with ``lirpa_deq.smoothing``:
   * ``Smooth``: every noisy sample is a full (converged) DEQ solve;
   * ``SerializedSmooth``: consecutive batches of noisy samples warm-start the DEQ from the previous
     batch's fixed points and run only ``--srs-steps`` solver iterations; the count of the fast
     predictions is then corrected so that the certificate is about the CONVERGED model -- by an
     audit of ``--audit-size`` positions re-classified with full solves, or (newer versions, for
     ``nn.Sequential(*pre, DEQ, *post)`` models) by per-sample agreement certificates
     (``extra['certificate']`` says which; proofs in docs/smoothing.md).
3. Report certified accuracy at a few l2 radii (correct class and certified radius >= r) and the
   time per image.

SRS pays off when the converged DEQ solve dominates the cost (many solver iterations, large
DEQs); on the small fc IBP-MonDEQ of --quick the solve takes ~6 Anderson steps, so SRS need not
be faster there. Every method has a largest certifiable radius (printed): plain RS's comes from
n; the audited SRS's also from the audit (about ln(2/alpha) / audit_size of the count is held back).

Guarantee: PROBABILISTIC -- with probability >= 1 - alpha per image, a returned (class, radius)
is correct for the smoothed classifier on the whole l2 ball of that radius. It certifies g, not
the base DEQ f.

    python examples/smoothing_srs.py --quick                 # embedded MNIST digits, ~25 s on 1 CPU thread
    python examples/smoothing_srs.py --n 10000 --num-images 100 --sigma 0.5
    python examples/smoothing_srs.py --data-root ~/data --dataset cifar10 --device cuda
"""
import time
from statistics import NormalDist

import torch

import lirpa_deq  # noqa: F401
from lirpa_deq.data import dataset_info, get_dataset
from lirpa_deq.models import build_model
from lirpa_deq.smoothing import ABSTAIN, SerializedSmooth, Smooth, cp_lower, hypergeom_upper
from _common import evenly_spaced, example_parser, parse_common, setup, train_naturally


def parse_args(argv=None):
    p = example_parser(__doc__)
    p.add_argument("--sigma", type=float, default=0.25, help="noise level, also used in training (default 0.25)")
    p.add_argument("--n", type=int, default=None, help="estimation samples per image (default 1000 quick / 10000)")
    p.add_argument("--n0", type=int, default=100, help="selection samples per image (default 100)")
    p.add_argument("--alpha", type=float, default=0.001, help="failure probability per image (default 0.001)")
    p.add_argument("--batch-size", type=int, default=500, help="noisy samples per DEQ call (default 500)")
    p.add_argument("--srs-steps", type=int, default=1, help="SRS solver iterations per warm-started batch")
    p.add_argument("--audit-size", type=int, default=400, help="SRS audit: converged re-classifications")
    p.add_argument("--radii", type=float, nargs="+", default=[0.0, 0.25, 0.5], help="l2 radii of the table")
    p.add_argument("--num-images", type=int, default=None, help="test images (default 20 quick / 100)")
    p.add_argument("--width", type=int, default=None, help="DEQ width of the fc-deq (default 64 quick / 128)")
    p.add_argument("--epochs", type=int, default=None, help="noise-augmented training epochs (default 3 / 10)")
    args = parse_common(p, argv)
    args.n = args.n or (1000 if args.quick else 10000)
    args.num_images = args.num_images or (20 if args.quick else 100)
    args.width = args.width or (64 if args.quick else 128)
    args.epochs = args.epochs or (3 if args.quick else 10)
    return args


def main(argv=None):
    args = parse_args(argv)
    device = setup(args)
    info = dataset_info(args.dataset)

    model = build_model("fc-deq", info.input_shape, info.num_classes, width=args.width).to(device)
    train = get_dataset(args.dataset, "train", args.data_root)
    print(f"noise-augmented training (sigma={args.sigma}) of fc-deq (width {args.width}) on {len(train)} images")
    # Gaussian data augmentation (Cohen et al.): the base classifier must be accurate under noise
    train_naturally(model, train, args.epochs, device, args.seed, noise=args.sigma)
    model.eval()  # the smoothing classes call the model under no_grad; eval mode is our job

    x, y = evenly_spaced(get_dataset(args.dataset, "test", args.data_root), args.num_images)
    x = x.to(device)

    certifiers = {
        "plain RS": Smooth(model, info.num_classes, args.sigma, input_shape=info.input_shape),
        f"SRS ({args.srs_steps} step)": SerializedSmooth(model, info.num_classes, args.sigma, steps=args.srs_steps,
                                                        audit_size=min(args.audit_size, args.n),
                                                        input_shape=info.input_shape),
    }
    results = {}
    for name, sm in certifiers.items():
        preds, radii, harmful, modes = [], [], 0, set()
        t0 = time.time()
        for i in range(len(y)):
            # one image at a time, no batch dimension; a fixed seed per image makes runs repeatable
            res = sm.certify_detailed(x[i], args.n0, args.n, args.alpha, args.batch_size, seed=args.seed + i)
            preds.append(int(res.prediction))
            radii.append(float(res.radius))
            extra = res.extra or {}
            harmful += int(extra.get("audit_harmful", 0))
            if isinstance(sm, SerializedSmooth):
                modes.add(extra.get("certificate", "audit"))
        seconds = (time.time() - t0) / len(y)
        preds, radii = torch.tensor(preds), torch.tensor(radii)
        correct = preds == y
        acc = [100 * float((correct & (radii >= r)).float().mean()) for r in args.radii]
        results[name] = {"accuracy": acc, "seconds": seconds, "abstain": int((preds == ABSTAIN).sum()),
                         "harmful": harmful, "modes": modes}

    # ---- result table --------------------------------------------------------------------------
    print(f"\nRandomized smoothing, {len(y)} {args.dataset} test images, sigma={args.sigma}, n0={args.n0}, "
          f"n={args.n}, alpha={args.alpha}: l2 certified accuracy")
    print(f"{'method':16}" + "".join(f"{'r=' + format(r, 'g'):>9}" for r in args.radii)
          + f"{'s/image':>10}{'abstain':>9}")
    for name, res in results.items():
        print(f"{name:16}" + "".join(f"{a:8.1f}%" for a in res["accuracy"])
              + f"{res['seconds']:10.3f}{res['abstain']:9d}")
    srs = results[f"SRS ({args.srs_steps} step)"]
    print(f"SRS: speed-up {results['plain RS']['seconds'] / srs['seconds']:.2f}x over plain RS; "
          f"correction: {', '.join(sorted(srs['modes']))}")
    # Largest radius any image can get: every sample votes for the top class (and, for the audited
    # SRS, the audit sees no harmful disagreement; it gets alpha / 2, the count the other half).
    cap_plain = args.sigma * NormalDist().inv_cdf(cp_lower(args.n, args.n, args.alpha))
    caps = f"plain RS {cap_plain:.3f}"
    if "audit" in srs["modes"]:
        K, a2 = min(args.audit_size, args.n), args.alpha / 2  # audit_alpha_fraction = 0.5 (the default)
        cap_srs = args.sigma * NormalDist().inv_cdf(cp_lower(args.n - hypergeom_upper(0, args.n, K, a2), args.n, a2))
        caps += f", audited SRS {cap_srs:.3f}"
        print(f"SRS audit: {srs['harmful']} harmful disagreements (fast says the top class, converged does not) "
              f"in {len(y)} x {K} audited samples")
    print(f"largest certifiable radius: {caps} (raise --n / --audit-size)")
    return results


if __name__ == "__main__":
    main()
