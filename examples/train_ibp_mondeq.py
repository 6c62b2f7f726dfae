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
import argparse
import time

import torch

import lirpa_deq  # noqa: F401  (registers the DEQ operator with auto_LiRPA)
from lirpa_deq.data import get_dataset
from lirpa_deq.training import TrainConfig, Trainer, certify_bounds, pgd_robust, predict


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="small, fast run on the embedded MNIST digits")
    p.add_argument("--dataset", default=None,
                   help="mnist5k (embedded, default), digits, mnist or cifar10 (the last two need --data-root)")
    p.add_argument("--data-root", default=None, help="directory holding MNIST / CIFAR-10 files (never downloads)")
    p.add_argument("--model", default="conv-fc-deq", help="lirpa_deq.models registry name (default conv-fc-deq)")
    p.add_argument("--width", type=int, default=None, help="DEQ width (default 64 quick / 256)")
    p.add_argument("--eps-train", type=float, default=0.2, help="final training eps, l_inf (default 0.2)")
    p.add_argument("--eps", type=float, nargs="+", default=[0.05, 0.1], help="test eps (default 0.05 0.1)")
    p.add_argument("--epochs", type=float, default=None, help="epochs (default 8 quick / 30)")
    p.add_argument("--num-test", type=int, default=None, help="evenly spaced test images (default 200 quick / all)")
    p.add_argument("--save", default=None, metavar="PATH", help="write the trained checkpoint here")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1)")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    if args.dataset is None:
        args.dataset = "mnist" if args.data_root else "mnist5k"
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
    torch.set_num_threads(args.threads)
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
    x, y = get_dataset(config.dataset, "test", config.data_root).tensors
    num = args.num_test or (200 if args.quick else len(y))
    idx = torch.linspace(0, len(y) - 1, min(num, len(y))).round().long()  # evenly spaced (class-balanced)
    x, y = x[idx].to(args.device), y[idx].to(args.device)
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
