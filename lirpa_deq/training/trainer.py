"""Certified training loop with exact resume.

Determinism: the model is initialised after ``torch.manual_seed(seed)``; batch ``i`` of epoch
``e`` is taken from ``torch.randperm(N, generator=Generator().manual_seed(seed * 1_000_003 + e))``,
so the data order is a pure function of (seed, step), and every schedule (eps, kappa, beta, LR) is
a pure function of the global step. A checkpoint stores the model (parameters and buffers), the
optimizer state, the global step, the RNG states and the config, so training N steps straight and
training k steps, checkpointing, resuming and training N - k steps give bit-identical parameters
(on the same device and torch build; tested).

Schedules that do not fit: a warm-up + eps ramp longer than the run (e.g. ``--epochs 3`` with the
default 1 + 5 epochs) would end training part-way up the ramp (eps 0.005 instead of eps_train);
they are shrunk by :func:`schedules.fit_ramp` so that the last epoch trains at ``eps_train``, with
a :class:`RampFitWarning` (``Trainer.ramp_note`` holds its text). The fitted schedule is stored
in checkpoints and kept on resume while it still fits the (possibly longer) run.

Per step: clean forward through the BoundedModule (shared parameters), bounds at the scheduled
eps, loss ``kappa * natural + (1 - kappa) * robust`` (see ``losses``), Adam with the scheduled LR,
gradient-norm clipping, then the BoundedModule's buffers (BN statistics) are copied into the model.

Several processes (``torchrun``; ``lirpa_deq.distributed``): ``batch_size`` stays the GLOBAL
batch. Rank r trains on images r, r + W, r + 2W, ... of the step's global batch (W ranks), through
a ``DistributedDataParallel`` module whose forward is the certified loss of the BoundedModule
(which shares the model's parameters, so DDP's gradient all-reduce sees the gradients of the
bounds). Each rank's loss is weighted by (its images) x W / (global batch), so DDP's average of
the gradients is the gradient of the mean loss over the global batch: the one-process step, up to
float rounding (tested). BatchNorm normalises with each rank's own images (no SyncBatchNorm inside
auto_LiRPA); the running statistics are averaged over the ranks after every step. Only rank 0
logs and writes checkpoints (atomically; every rank's RNG state is stored); the data order does not
depend on W, so a run may be resumed with another number of processes.
"""
from __future__ import annotations

import math
import time
import warnings
from typing import Callable, Optional

import torch

from .. import distributed
from .._progress import Progress
from ..data import dataset_info, get_dataset
from ..models import build_model
from .checkpoint import (CheckpointError, load_checkpoint, rng_state, save_checkpoint, set_rng_state)
from .config import TrainConfig
from .._compat import copy_buffers
from .losses import certified_loss, make_bounded, sync_buffers
from .schedules import LinearRamp, SmoothedRamp, StepLR, fit_ramp
from ..validate import check_finite_params, check_labels, check_x


class RampFitWarning(UserWarning):
    """The warm-up + eps ramp was longer than the run and has been shrunk to fit it."""


class Trainer:
    """Train ``config.model`` on ``config.dataset`` with ``config.method``.

    train_set: optional TensorDataset (images (N, C, H, W) in [0, 1], labels (N,)) instead of
    loading ``config.dataset``'s training split (tests); checked like the loaded split (finite, in
    [0, 1], float32, integer labels in [0, num_classes): ValueError otherwise). device: where the
    model and batches live. dist: the :class:`lirpa_deq.distributed.Context` (default: this
    process's; in a process group every rank builds its own Trainer with the same arguments, and
    only rank 0 logs).
    """

    def __init__(self, config: TrainConfig, device="cpu", train_set=None, log: Optional[Callable] = print,
                 dist: Optional[distributed.Context] = None):
        self.dist = distributed.current() if dist is None else dist
        self.config, self.device = config, torch.device(device)
        self.log = (log if self.dist.is_main else None) or (lambda *a, **k: None)
        info = dataset_info(config.dataset)
        data = train_set if train_set is not None else get_dataset(config.dataset, "train", config.data_root)
        X, Y = data.tensors
        if config.num_train is not None and config.num_train < len(Y):
            # evenly spaced: the embedded splits are ordered by class, a prefix would be one class
            keep = torch.linspace(0, len(Y) - 1, config.num_train).round().long()
            X, Y = X[keep], Y[keep]
        self.X, self.Y = X, Y
        self.input_shape, self.num_classes = tuple(X.shape[1:]), int(info.num_classes)
        torch.manual_seed(config.seed)
        self.model = build_model(config.model, self.input_shape, self.num_classes, **config.model_kwargs)
        self.model.to(self.device).train()
        if self.dist.rank > 0:  # same initial model on every rank, then a stream of its own
            torch.manual_seed(distributed.rank_seed(config.seed, self.dist.rank))
        self._ddp = None  # built at the first distributed step (after a resume has loaded the weights)
        check_x(X, self.model, clip=(0.0, 1.0), name="the training images", device=False)
        check_labels(Y, len(X), self.num_classes, name="the training labels")
        self.bounded = make_bounded(self.model, X[:1].to(self.device))
        self.bounded.train()
        self.optimizer = torch.optim.Adam(self.model.parameters(), lr=config.lr)
        self.step = 0
        self.metrics = {"train_seconds": 0.0, "train_cpu_seconds": 0.0}
        spe = self.steps_per_epoch
        self.ramp_note = None
        warm, ramp = round(config.warmup_epochs * spe), round(config.ramp_epochs * spe)
        fit_warm, fit_ramp_steps, fitted = fit_ramp(warm, ramp, self.total_steps, spe)
        if fitted:
            tail = self.total_steps - fit_warm - fit_ramp_steps
            self.ramp_note = (f"the warm-up + eps ramp ({config.warmup_epochs:g} + {config.ramp_epochs:g} epochs = "
                              f"{warm + ramp} steps) does not end before the last epoch of this {config.epochs:g}-epoch "
                              f"run ({self.total_steps} steps): shrunk to {fit_warm} + {fit_ramp_steps} steps so that "
                              f"the last {tail} step(s){' (the last epoch)' if tail == spe else ''} train at "
                              f"eps_train={config.eps_train:g}; raise epochs or shorten ramp_epochs / warmup_epochs "
                              "(--epochs, --ramp-epochs, --warmup-epochs) to choose yourself")
            if not getattr(self, "_resuming", False):  # resume() decides after reading the checkpoint
                warnings.warn(self.ramp_note, RampFitWarning, stacklevel=2)
        self._set_schedules(fit_warm, fit_ramp_steps)
        self.lr_schedule = StepLR(config.lr, [round(m * spe) for m in config.lr_milestones], config.lr_gamma)

    def _set_schedules(self, warm: int, ramp: int) -> None:
        """eps / kappa / beta schedules with a warm-up of ``warm`` and a ramp of ``ramp`` steps."""
        cfg = self.config
        self.ramp_steps = (int(warm), int(ramp))
        self.eps_schedule = SmoothedRamp(cfg.eps_train, warm, ramp, mid=cfg.ramp_mid, beta=cfg.ramp_beta)
        self.kappa_schedule = LinearRamp(1.0, cfg.kappa_final, warm, ramp)
        self.beta_schedule = LinearRamp(cfg.beta_start, cfg.beta_final, warm, ramp)

    # ---------------------------------------------------------------------------- bookkeeping
    @property
    def steps_per_epoch(self) -> int:
        return math.ceil(len(self.Y) / self.config.batch_size)

    @property
    def total_steps(self) -> int:
        return math.ceil(self.config.epochs * self.steps_per_epoch)

    def schedule(self, step: int) -> dict:
        """eps, kappa, beta and lr at a global step."""
        return {"eps": self.eps_schedule(step), "kappa": self.kappa_schedule(step),
                "beta": self.beta_schedule(step), "lr": self.lr_schedule(step)}

    def batch(self, step: int):
        """(x, y) of a global step, on the trainer's device."""
        epoch, i = divmod(step, self.steps_per_epoch)
        g = torch.Generator().manual_seed(self.config.seed * 1_000_003 + epoch)
        idx = torch.randperm(len(self.Y), generator=g)[i * self.config.batch_size:(i + 1) * self.config.batch_size]
        return self.X[idx].to(self.device), self.Y[idx].to(self.device)

    def local_batch(self, step: int):
        """(x, y, weight): this rank's share of the global batch of ``step`` (images rank, rank + W,
        ...) and the weight (its images x W / global batch) that makes the average over the W ranks
        of the weighted losses the mean loss of the global batch. A rank left without images (a
        last batch smaller than W) gets the first image with weight 0."""
        x, y = self.batch(step)
        world, rank = self.dist.world_size, self.dist.rank
        if world == 1:
            return x, y, 1.0
        xs, ys = x[rank::world], y[rank::world]
        if len(ys) == 0:
            return x[:1], y[:1], 0.0
        return xs, ys, len(ys) * world / len(y)

    # ---------------------------------------------------------------------------- training
    def train_step(self) -> dict:
        """One optimisation step at ``self.step``; returns its stats (loss, clean_acc, verified, ...;
        means over the global batch)."""
        cfg, s = self.config, self.schedule(self.step)
        for group in self.optimizer.param_groups:
            group["lr"] = s["lr"]
        self.bounded.train()
        if self.dist.enabled:
            x, y, weight = self.local_batch(self.step)
            loss, stats = self._distributed_loss()(x, y, s["eps"], s["kappa"], s["beta"], weight)
            stats = _global_stats(stats, len(y) if weight > 0 else 0, loss.device)
            value = stats["loss"]
        else:
            x, y = self.batch(self.step)
            loss, stats = certified_loss(self.bounded, x, y, s["eps"], cfg.method, kappa=s["kappa"], beta=s["beta"],
                                         num_classes=self.num_classes, norm=cfg.norm)
            value = float(loss.detach())
        if not math.isfinite(value):  # the global loss in a process group: every rank stops here together
            raise FloatingPointError(f"non-finite loss {value} at step {self.step} (eps {s['eps']:.4f}); "
                                     "lower the learning rate or lengthen the eps ramp")
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()  # under DDP the gradients arrive averaged over the ranks
        if cfg.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), cfg.grad_clip)
        self.optimizer.step()
        sync_buffers(self.bounded, self.model)
        distributed.average_buffers_(self.model)
        self.step += 1
        stats.update(loss=value, **s)
        return stats

    def _distributed_loss(self):
        """The DDP module computing this rank's weighted certified loss (built once)."""
        if self._ddp is None:
            from torch.nn.parallel import DistributedDataParallel

            module = _CertifiedLoss(self.model, self.bounded, self.config.method, self.num_classes, self.config.norm)
            ids = [self.device.index] if self.device.type == "cuda" else None
            # buffers: the model's are not read in training mode (BN uses batch statistics) and
            # are averaged after each step, so DDP's per-forward broadcast of rank 0's is not needed
            self._ddp = DistributedDataParallel(module, device_ids=ids, broadcast_buffers=False)
        return self._ddp

    def train(self, max_steps: Optional[int] = None, checkpoint_path=None, progress: bool = True) -> dict:
        """Train until ``total_steps`` (or global step ``max_steps``); checkpoint at each epoch end
        and at the end when ``checkpoint_path`` is given. Returns ``self.metrics``."""
        end = self.total_steps if max_steps is None else min(int(max_steps), self.total_steps)
        spe = self.steps_per_epoch
        bar = Progress(progress, end, "train", unit="step", initial=self.step)
        t0, c0 = time.time(), time.process_time()
        sums = _Running()
        try:
            while self.step < end:
                stats = self.train_step()
                sums.add(stats)
                bar.advance(1)
                bar.postfix(sums.postfix())
                if self.step % spe == 0 or self.step == end:
                    self.metrics.update(epoch=self.step / spe, **sums.means())
                    line = f"epoch {self.step / spe:.2f} step {self.step}/{self.total_steps} {sums.postfix()}"
                    bar.clear()
                    self.log(line)
                    bar.refresh()
                    sums = _Running()
                    if checkpoint_path is not None:
                        self._add_time(t0, c0)
                        t0, c0 = time.time(), time.process_time()
                        self.save(checkpoint_path)
        finally:
            bar.close()
        self._add_time(t0, c0)
        self.model.eval()
        return self.metrics

    def _add_time(self, t0, c0):
        self.metrics["train_seconds"] += time.time() - t0
        self.metrics["train_cpu_seconds"] += time.process_time() - c0

    # ---------------------------------------------------------------------------- checkpoints
    def model_spec(self) -> dict:
        return {"name": self.config.model, "kwargs": dict(self.config.model_kwargs),
                "input_shape": list(self.input_shape), "num_classes": self.num_classes}

    def save(self, path) -> str:
        """Atomic checkpoint of everything needed to resume exactly. FloatingPointError (and the
        previous checkpoint kept) if the weights hold NaN / inf. In a process group every rank
        must call it (the RNG states are gathered); rank 0 alone writes, the others wait for it."""
        try:
            check_finite_params(self.model, "the model being trained")
        except ValueError as exc:
            raise FloatingPointError(f"{exc} (at step {self.step}; {path} was not overwritten)") from None
        payload = {
            "config": self.config.to_dict(), "model": self.model_spec(), "model_state": self.model.state_dict(),
            "optimizer_state": self.optimizer.state_dict(), "step": self.step, "rng": rng_state(),
            "metrics": dict(self.metrics, total_steps=self.total_steps),
            "schedule": {"warmup_steps": self.ramp_steps[0], "ramp_steps": self.ramp_steps[1]}}
        if self.dist.enabled:
            payload["rng_ranks"] = distributed.all_gather_objects(payload["rng"])
        if self.dist.is_main:
            save_checkpoint(path, payload)
        distributed.barrier()  # no rank reads or moves past a checkpoint that is not written yet
        return str(path)

    @classmethod
    def resume(cls, path, config: Optional[TrainConfig] = None, device="cpu", train_set=None, log=print,
               dist: Optional[distributed.Context] = None):
        """A Trainer continuing the checkpoint at ``path``. ``config`` (optional) may change
        non-identity fields (e.g. more epochs); identity fields (dataset, model, model_kwargs,
        method, batch_size, seed, norm, num_train) must match: CheckpointError otherwise. In a
        process group every rank resumes from the same file; each rank restores its own RNG state
        when the checkpoint was written by as many ranks, else rank 0's plus its per-rank seed."""
        data = load_checkpoint(path, map_location=device)
        try:
            saved = TrainConfig.from_dict(data["config"])
        except (ValueError, TypeError) as exc:
            raise CheckpointError(f"checkpoint {str(path)!r} has an invalid config ({exc})") from None
        if config is None:
            config = saved
        diff = {k: (v, config.identity()[k]) for k, v in saved.identity().items() if config.identity()[k] != v}
        if diff:
            first = next(iter(diff))
            raise CheckpointError(f"checkpoint {str(path)!r} does not match this run: {first} is "
                                  f"{diff[first][0]!r} in the checkpoint but {diff[first][1]!r} here"
                                  + (f" (and {len(diff) - 1} more)" if len(diff) > 1 else ""))
        if "optimizer_state" not in data or "rng" not in data:
            raise CheckpointError(f"checkpoint {str(path)!r} has no optimizer/RNG state: it cannot be resumed")
        trainer = cls.__new__(cls)
        trainer._resuming = True
        trainer.__init__(config, device=device, train_set=train_set, log=log, dist=dist)
        trainer._resume_schedule(data.get("schedule"))
        if data["model"] != trainer.model_spec():
            raise CheckpointError(f"checkpoint {str(path)!r} holds model {data['model']}, this run builds "
                                  f"{trainer.model_spec()}")
        try:
            trainer.model.load_state_dict(data["model_state"])
            trainer.optimizer.load_state_dict(data["optimizer_state"])
        except (RuntimeError, ValueError, KeyError) as exc:
            raise CheckpointError(f"checkpoint {str(path)!r} does not fit the model/optimizer "
                                  f"({str(exc).splitlines()[0]})") from None
        copy_buffers(trainer.bounded, trainer.model, into="bounded")  # BN buffers of the bounded copy
        trainer.step = int(data["step"])
        trainer.metrics.update(data.get("metrics", {}))
        trainer._restore_rng(data)
        return trainer

    def _restore_rng(self, data) -> None:
        ranks, rank = data.get("rng_ranks"), self.dist.rank
        if ranks is not None and len(ranks) == self.dist.world_size:
            set_rng_state(ranks[rank])
            return
        set_rng_state(data["rng"])
        if rank > 0:  # another number of ranks than the run that wrote it: a fresh stream of its own
            torch.manual_seed(distributed.rank_seed(self.config.seed * 1_000_003 + self.step, rank))


    def _resume_schedule(self, saved) -> None:
        """Keep the checkpoint's (possibly fitted) warm-up / ramp while it still ends before the last
        epoch of this run (the steps already done followed it); else keep this run's own schedule
        and warn if that one had to be fitted."""
        self._resuming = False
        if saved:
            warm, ramp = int(saved["warmup_steps"]), int(saved["ramp_steps"])
            if (warm, ramp) != self.ramp_steps and not fit_ramp(warm, ramp, self.total_steps, self.steps_per_epoch)[2]:
                self._set_schedules(warm, ramp)
                self.ramp_note = None
        if self.ramp_note is not None:
            warnings.warn(self.ramp_note, RampFitWarning, stacklevel=3)


class _CertifiedLoss(torch.nn.Module):
    """forward(x, y, eps, kappa, beta, weight) -> (weight x certified loss, stats) of the shared
    BoundedModule. The model is its one submodule, so DistributedDataParallel registers (and
    all-reduces) the model's parameters, which are the BoundedModule's too; the BoundedModule
    itself is held outside the module tree (its parameters would otherwise be registered twice)."""

    def __init__(self, model, bounded, method, num_classes, norm):
        super().__init__()
        self.model = model
        object.__setattr__(self, "bounded", bounded)
        self.method, self.num_classes, self.norm = method, num_classes, norm

    def forward(self, x, y, eps, kappa, beta, weight):
        loss, stats = certified_loss(self.bounded, x, y, eps, self.method, kappa=kappa, beta=beta,
                                     num_classes=self.num_classes, norm=self.norm)
        return loss * weight, dict(stats, loss=float(loss.detach()))


_STAT_KEYS = ("loss", "natural", "clean_acc", "robust", "verified")


def _global_stats(stats: dict, n: int, device) -> dict:
    """Means over the global batch of the per-rank means in ``stats`` (``n``: this rank's images;
    0 for a stand-in image), summed over the ranks (one all-reduce). None stays None (it is None
    on every rank: same eps and method)."""
    vals = [float(n)] + [n * stats[k] if (n and stats[k] is not None) else 0.0 for k in _STAT_KEYS]
    total = distributed.all_reduce_sum_(torch.tensor(vals, dtype=torch.float64, device=device)).tolist()
    return {k: (None if stats[k] is None else total[i + 1] / total[0]) for i, k in enumerate(_STAT_KEYS)}


class _Running:
    """Running means of the step stats shown in the progress bar and epoch lines."""

    def __init__(self):
        self.sum, self.count, self.eps = {}, {}, 0.0

    def add(self, stats):
        for k in ("loss", "clean_acc", "verified"):
            if stats.get(k) is not None:
                self.sum[k] = self.sum.get(k, 0.0) + stats[k]
                self.count[k] = self.count.get(k, 0) + 1
        self.eps = stats["eps"]

    def means(self):
        return {k: v / self.count[k] for k, v in self.sum.items()}

    def postfix(self):
        m = self.means()
        out = f"eps={self.eps:.3f} loss={m.get('loss', float('nan')):.3f} acc={m.get('clean_acc', 0):.3f}"
        if "verified" in m:
            out += f" ibp_ver={m['verified']:.3f}"
        return out

