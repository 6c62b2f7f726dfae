#!/usr/bin/env python
"""CROWN-IBP certified training of a DEQ, then clean / IBP / CROWN certified accuracy.

The DEQ analogue of auto_LiRPA's ``examples/vision/simple_training.py --bound_type CROWN-IBP``:

* loss (Zhang et al. 2020): the margin lower bound is ``beta * lb_CROWN-IBP + (1 - beta) * lb_IBP``
  with beta ramping 1 -> 0 with eps; the CROWN-IBP bound is a backward (CROWN) pass through the
  layers AND the DEQ (the adjoint DEQ of docs/crown.md) on top of the IBP intermediate bounds;
* evaluation at every ``--eps``: clean accuracy, PGD accuracy (upper bound), IBP certified and
  CROWN certified accuracy. CROWN is intersected with IBP (both are sound lower bounds of the
  margins, so their maximum is), so it never certifies fewer points.

    python examples/train_crown_ibp_deq.py --quick           # embedded MNIST digits, ~35 s on 1 CPU thread
    python examples/train_crown_ibp_deq.py                   # the demo's recipe with CROWN-IBP (~3 min)
    python examples/train_crown_ibp_deq.py --data-root ~/data --dataset mnist --device cuda
"""
import time


import lirpa_deq  # noqa: F401  (registers the DEQ operator with auto_LiRPA)
from lirpa_deq.data import get_dataset
from lirpa_deq.training import TrainConfig, Trainer, certify_bounds, make_bounded, pgd_robust, predict
from _common import add_training_args, evenly_spaced, example_parser, parse_common, setup


def parse_args(argv=None):
    p = example_parser(__doc__)
    add_training_args(p, quick_epochs=5, quick_tests=100)
    args = parse_common(p, argv)
    return args


def config_for(args):
    """Full: the demo's recipe with method='crown-ibp' (docs/training.md); quick: 5 short epochs."""
    width = args.width or (64 if args.quick else 256)
    kwargs = {"width": width}
    if args.model == "conv-fc-deq":
        kwargs["channels"] = 8 if args.quick else 16
    common = dict(dataset=args.dataset, data_root=args.data_root, model=args.model, model_kwargs=kwargs,
                  method="crown-ibp", eps_train=args.eps_train, batch_size=64, seed=args.seed,
                  beta_start=1.0, beta_final=0.0)  # CROWN-IBP weight: 1 -> 0 over the eps ramp
    if args.quick:
        return TrainConfig(**common, epochs=args.epochs or 5, lr=2e-3, lr_milestones=(4,), warmup_epochs=0.5,
                           ramp_epochs=3)
    epochs = args.epochs or 30
    return TrainConfig(**common, epochs=epochs, lr=1e-3, lr_milestones=(20, 25) if epochs >= 30 else (),
                       warmup_epochs=1, ramp_epochs=10)


def main(argv=None):
    args = parse_args(argv)
    setup(args)
    config = config_for(args)

    # ---- training ------------------------------------------------------------------------------
    trainer = Trainer(config, device=args.device)
    print(f"CROWN-IBP training of {config.model} {config.model_kwargs} on {len(trainer.Y)} {config.dataset} "
          f"images: {trainer.total_steps} steps, eps_train {config.eps_train}")
    metrics = trainer.train(progress=False)
    if args.save:
        trainer.save(args.save)
        print(f"saved {args.save}")
    model = trainer.model.eval()

    # ---- evaluation ----------------------------------------------------------------------------
    test = get_dataset(config.dataset, "test", config.data_root)
    x, y = evenly_spaced(test, args.num_test or (100 if args.quick else len(test)))  # class-balanced
    x, y = x.to(args.device), y.to(args.device)
    bounded = make_bounded(model, x[:1])  # one BoundedModule for all certification calls
    clean = 100 * float((predict(model, x) == y).float().mean())
    rows = {"PGD accuracy (upper bound)": [], "IBP certified accuracy": [], "CROWN certified accuracy": []}
    seconds = {"IBP": 0.0, "CROWN": 0.0}
    for eps in args.eps:
        rows["PGD accuracy (upper bound)"].append(pgd_robust(model, x, y, eps, steps=10 if args.quick else 20))
        for method in ("IBP", "CROWN"):
            t0 = time.time()
            cert, _ = certify_bounds(model, x, y, eps, method=method, num_classes=trainer.num_classes,
                                     bounded=bounded)
            seconds[method] += time.time() - t0
            rows[f"{method} certified accuracy"].append(cert)

    # ---- result table --------------------------------------------------------------------------
    per_image = {m: 1000 * s / len(y) / len(args.eps) for m, s in seconds.items()}
    print(f"\nCROWN-IBP-trained {config.model}, {len(y)} {config.dataset} test images, l_inf "
          f"(training {metrics['train_seconds']:.1f} s; ms/image: IBP {per_image['IBP']:.2f}, "
          f"CROWN {per_image['CROWN']:.2f})")
    print(f"{'':28}" + "".join(f"{'eps=' + format(e, 'g'):>10}" for e in args.eps))
    print(f"{'clean accuracy':28}{clean:9.1f}%")
    result = {"clean": clean}
    for name, values in rows.items():
        pct = [100 * float(v.float().mean()) for v in values]
        result[name] = pct
        print(f"{name:28}" + "".join(f"{v:9.1f}%" for v in pct))
    return result


if __name__ == "__main__":
    main()
