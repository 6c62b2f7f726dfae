"""``lirpa-deq train``: certified training into an output directory (checkpoint.pt, resumable).

``--resume`` continues ``<out>/checkpoint.pt`` (or ``--resume PATH``) exactly; the identity of the
run (dataset, model, method, batch size, seed, ...) must match the checkpoint, while e.g.
``--epochs`` may grow. Without ``--resume`` an existing checkpoint in ``--out`` is an error (so
a run is never overwritten by accident). ``--out`` is checked writable before training starts;
checkpoints are written atomically. A warm-up + ramp longer than the run is shrunk to fit it
(the last epoch trains at ``--eps-train``) and a ``warning:`` line says so.
"""
from __future__ import annotations

import ast
import os

from ..data import dataset_info
from ..training import TrainConfig, Trainer
from ..training.checkpoint import load_checkpoint
from ..validate import check_writable_dir


def parse_model_opts(pairs):
    """['width=64', 'cell=ortho'] -> {'width': 64, 'cell': 'ortho'} (values parsed as python
    literals when possible)."""
    out = {}
    for item in pairs or ():
        if "=" not in item:
            raise ValueError(f"--model-opt expects KEY=VALUE, got {item!r}")
        k, v = item.split("=", 1)
        try:
            out[k.strip()] = ast.literal_eval(v)
        except (ValueError, SyntaxError):
            out[k.strip()] = v
    return out


def config_from_args(args) -> TrainConfig:
    kwargs = parse_model_opts(args.model_opt)
    if args.width is not None:
        kwargs["width"] = args.width
    return TrainConfig(dataset=args.dataset, data_root=args.data_root, model=args.model, model_kwargs=kwargs,
                       method=args.method, eps_train=args.eps_train, epochs=args.epochs, batch_size=args.batch_size,
                       lr=args.lr, lr_milestones=tuple(args.lr_milestones), lr_gamma=args.lr_gamma,
                       grad_clip=args.grad_clip, warmup_epochs=args.warmup_epochs, ramp_epochs=args.ramp_epochs,
                       kappa_final=args.kappa_final, seed=args.seed, num_train=args.num_train)


def run_train(args, log=print):
    """The ``train`` subcommand. Returns the exit code."""
    info = dataset_info(args.dataset)
    if info.needs_root and not args.data_root:
        raise ValueError(f"dataset {args.dataset!r} is read from local files: pass --data-root DIR")
    if args.data_root and not os.path.isdir(args.data_root):
        raise ValueError(f"--data-root {args.data_root!r} is not a directory")
    config = config_from_args(args)
    check_writable_dir(args.out, "--out")  # before any work: a long run must not die at its first save
    path = os.path.join(args.out, "checkpoint.pt")
    resume = args.resume
    if resume is not None:
        ckpt = path if resume == "" else resume
        log(f"resuming {ckpt} (step {load_checkpoint(ckpt)['step']})")
        trainer = Trainer.resume(ckpt, config=config, device=args.device, log=log)
    else:
        if os.path.exists(path):
            raise ValueError(f"{path} exists: pass --resume to continue it, or choose another --out")
        trainer = Trainer(config, device=args.device, log=log)
    if trainer.ramp_note:  # main() silences UserWarnings (auto_LiRPA chatter): say it here
        log(f"warning: {trainer.ramp_note}")
    log(f"training {config.model} {config.model_kwargs or ''} on {config.dataset} with {config.method}, "
        f"eps_train={config.eps_train}, {trainer.total_steps} steps ({trainer.steps_per_epoch}/epoch) -> {path}")
    metrics = trainer.train(max_steps=args.max_steps, checkpoint_path=path, progress=not args.no_progress)
    log(f"done: step {trainer.step}/{trainer.total_steps}, {metrics['train_seconds']:.0f}s wall, "
        f"{metrics['train_cpu_seconds']:.0f}s CPU; checkpoint {path}")
    return 0
