#!/usr/bin/env python
"""IBP certified training of an IBP-MonDEQ, then clean / PGD / IBP-certified accuracy.

The DEQ analogue of auto_LiRPA's ``examples/vision/simple_training.py`` with ``--bound_type IBP``:

* model: ``conv-fc-deq`` from ``lirpa_deq.models`` (two strided convs, then a fully connected
  IBP-MonDEQ ``z* = relu(W z* + u)`` whose interval fixed point is provable), or any registry name;
* training: ``lirpa_deq.training.Trainer`` -- loss ``kappa * CE + (1 - kappa) * robust CE`` where
  the robust CE uses auto_LiRPA's IBP lower bounds of the margins f_y - f_j over the l_inf ball
  (through the DEQ: the PROVED interval fixed point, with implicit-function gradients); eps ramps
  from 0 to ``--eps-train`` after a warm-up (Wei & Kolter 2022 / CROWN-IBP schedules);
* evaluation at every ``--eps``: clean accuracy, PGD accuracy (an upper bound on any certified
  accuracy), IBP certified accuracy (a proof: sound for every input of the ball).

    python examples/train_ibp_mondeq.py --quick              # embedded MNIST digits, ~25 s on 1 CPU thread
    python examples/train_ibp_mondeq.py                      # the demo's recipe (30 epochs, ~80 s)
    python examples/train_ibp_mondeq.py --save runs/ibp.pt   # then: examples/simple_verification.py --load runs/ibp.pt
    python examples/train_ibp_mondeq.py --data-root ~/data --dataset cifar10 --eps-train 0.0078 --eps 0.0078 --device cuda
"""
import time


import lirpa_deq  # noqa: F401  (registers the DEQ operator with auto_LiRPA)
from lirpa_deq.data import get_dataset
from lirpa_deq.training import TrainConfig, Trainer, certify_bounds, pgd_robust, predict
from _common import add_training_args, evenly_spaced, example_parser, parse_common, setup


def parse_args(argv=None):
    p = example_parser(__doc__)
    add_training_args(p, quick_epochs=8, quick_tests=200)
    args = parse_common(p, argv)
    return args


def config_for(args):
    """The training recipe. Full: the demo's (docs/training.md); quick: 8 short epochs."""
    if args.quick:
        return TrainConfig(dataset=args.dataset, data_root=args.data_root, model=args.model,
                           model_kwargs={"width": args.width or 64, "channels": 8}
                           if args.model == "conv-fc-deq" else ({"width": args.width} if args.width else {}),
                           method="ibp", eps_train=args.eps_train, epochs=args.epochs or 8, batch_size=64,
                           lr=2e-3, lr_milestones=(6,), warmup_epochs=0.5, ramp_epochs=4, seed=args.seed)
    kwargs = {"width": args.width or 256}
    if args.model == "conv-fc-deq":
        kwargs["channels"] = 16
    return TrainConfig(dataset=args.dataset, data_root=args.data_root, model=args.model, model_kwargs=kwargs,
                       method="ibp", eps_train=args.eps_train, epochs=args.epochs or 30, batch_size=64, lr=1e-3,
                       lr_milestones=(20, 25) if (args.epochs or 30) >= 30 else (), warmup_epochs=1,
                       ramp_epochs=10, seed=args.seed)


def main(argv=None):
    args = parse_args(argv)
    setup(args)
    config = config_for(args)

    # ---- training ------------------------------------------------------------------------------
    trainer = Trainer(config, device=args.device)  # builds the model and its BoundedModule
    print(f"IBP training of {config.model} {config.model_kwargs} on {len(trainer.Y)} {config.dataset} images: "
          f"{trainer.total_steps} steps, eps_train {config.eps_train}")
    metrics = trainer.train(progress=False)  # prints one line per epoch
    if args.save:
        trainer.save(args.save)  # atomic; reload with lirpa_deq.training.model_from_checkpoint
        print(f"saved {args.save}")
    model = trainer.model.eval()

    # ---- evaluation ----------------------------------------------------------------------------
    test = get_dataset(config.dataset, "test", config.data_root)
    x, y = evenly_spaced(test, args.num_test or (200 if args.quick else len(test)))  # class-balanced
    x, y = x.to(args.device), y.to(args.device)
    clean = 100 * float((predict(model, x) == y).float().mean())
    pgd, ibp, seconds = [], [], 0.0
    for eps in args.eps:
        pgd.append(100 * float(pgd_robust(model, x, y, eps, steps=10 if args.quick else 20).float().mean()))
        t0 = time.time()
        cert, _ = certify_bounds(model, x, y, eps, method="IBP", num_classes=trainer.num_classes)
        seconds += time.time() - t0
        ibp.append(100 * float(cert.float().mean()))

    # ---- result table --------------------------------------------------------------------------
    print(f"\nIBP-trained {config.model}, {len(y)} {config.dataset} test images, l_inf "
          f"(training {metrics['train_seconds']:.1f} s, IBP certification {1000 * seconds / len(y) / len(args.eps):.2f} ms/image)")
    print(f"{'':28}" + "".join(f"{'eps=' + format(e, 'g'):>10}" for e in args.eps))
    print(f"{'clean accuracy':28}{clean:9.1f}%")
    print(f"{'PGD accuracy (upper bound)':28}" + "".join(f"{v:9.1f}%" for v in pgd))
    print(f"{'IBP certified accuracy':28}" + "".join(f"{v:9.1f}%" for v in ibp))
    return {"clean": clean, "pgd": pgd, "ibp": ibp}


if __name__ == "__main__":
    main()
