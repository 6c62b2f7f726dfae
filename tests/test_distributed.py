"""Several processes: ``lirpa-deq train`` / ``certify`` on 2 CPU ranks (gloo) against one process.

The ranks are forked from this test process with the variables torchrun sets (RANK, WORLD_SIZE,
LOCAL_RANK, MASTER_ADDR, MASTER_PORT on a free port) and run the unchanged ``lirpa_deq.cli.main``;
one certification goes through ``torchrun`` itself. Checked: an epoch on 2 ranks (2 steps, a
checkpoint, a resume on 2 ranks, 2 more steps; 3 epochs) gives the one-process model with the same global
batch to float tolerance; the results file of a certification is the same (timings aside) in one
process, on 2 ranks, under torchrun and from ``--shard 0/2`` + ``--shard 1/2`` + ``merge``.

Skipped only where this torch build has no ``torch.distributed`` or no gloo backend (the
distributed code paths cannot run there at all).
"""
import json
import os
import socket
import subprocess
import sys

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from lirpa_deq import _progress as progress
from lirpa_deq import distributed
from lirpa_deq.cli import main
from lirpa_deq.training import TrainConfig, Trainer, load_checkpoint

pytestmark = pytest.mark.skipif(not (dist.is_available() and dist.is_gloo_available()),
                                reason="this torch build has no torch.distributed / gloo backend")

TRAIN = ["train", "--dataset", "digits", "--model", "fc-deq", "--width", "16", "--num-train", "115",
         "--batch-size", "30", "--epochs", "3", "--warmup-epochs", "0.5", "--ramp-epochs", "1",
         "--eps-train", "0.05", "--lr", "2e-2", "--no-progress"]
CERTIFY = ["--num", "45", "--batch-size", "8", "--eps", "0.02", "0.05", "--method", "ibp", "crown", "smoothing",
           "--pgd-steps", "4", "--smoothing-num", "5", "--n", "24", "--n0", "6", "--alpha", "0.1", "--radii", "0",
           "0.1", "--no-progress"]
TIMING = ("pgd_seconds_per_image", "seconds_per_image", "seconds_per_evaluated_image")


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank(rank, world, port, argv):
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    rc = main(argv)
    if rc != 0:
        raise SystemExit(f"rank {rank}: lirpa-deq exited with {rc}")


def run_ranks(argv, world=2):
    """``lirpa-deq argv`` on ``world`` forked gloo ranks (raises if a rank fails)."""
    n = torch.get_num_threads()
    try:
        mp.start_processes(_rank, args=(world, _free_port(), argv), nprocs=world, start_method="fork")
    finally:
        torch.set_num_threads(n)


def one_process(argv):
    n = torch.get_num_threads()
    try:
        return main(argv)
    finally:
        torch.set_num_threads(n)


def results(path):
    """The JSON lines of a results file without its timing fields."""
    def strip(o):
        if isinstance(o, dict):
            return {k: strip(v) for k, v in o.items() if k not in TIMING}
        return [strip(v) for v in o] if isinstance(o, list) else o

    return [strip(json.loads(line)) for line in open(path)]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """3 epochs (steps of 30, 30, 30 and 25 images: the last splits 13 / 12) in one process and on
    2 ranks (stopped after 6 steps and resumed on 2 ranks)."""
    root = tmp_path_factory.mktemp("dist")
    assert one_process(TRAIN + ["--out", str(root / "one")]) == 0
    run_ranks(TRAIN + ["--out", str(root / "two"), "--max-steps", "6"])
    half = load_checkpoint(root / "two" / "checkpoint.pt")
    run_ranks(TRAIN + ["--out", str(root / "two"), "--resume"])
    return root, half


def test_two_ranks_train_the_one_process_model(runs):
    root, half = runs
    one, two = load_checkpoint(root / "one" / "checkpoint.pt"), load_checkpoint(root / "two" / "checkpoint.pt")
    assert half["step"] == 6 and len(half["rng_ranks"]) == 2 and two["step"] == one["step"] == 12
    assert os.listdir(root / "two") == ["checkpoint.pt"]  # rank 0 alone wrote, atomically (no temporary left)
    assert one["model_state"].keys() == two["model_state"].keys()
    moved = 0.0
    for k, v in one["model_state"].items():
        torch.testing.assert_close(two["model_state"][k], v, rtol=1e-5, atol=1e-6)
        moved = max(moved, float((v - half["model_state"][k]).abs().max()))
    assert moved > 1e-3  # the steps after the resume changed the model: the comparison is not vacuous
    for a, b in zip(one["optimizer_state"]["state"].values(), two["optimizer_state"]["state"].values()):
        torch.testing.assert_close(b["exp_avg_sq"], a["exp_avg_sq"], rtol=1e-4, atol=1e-9)


def _collectives(rank, world, port):
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    ctx, device = distributed.init_from_env("cpu")
    try:
        assert (ctx.rank, ctx.world_size, ctx.backend, device) == (rank, world, "gloo", "cpu")
        bn = torch.nn.BatchNorm1d(2)
        bn.running_mean.fill_(float(rank))
        bn.num_batches_tracked.fill_(5)
        distributed.average_buffers_(bn)
        assert bn.running_mean.tolist() == [0.5, 0.5] and int(bn.num_batches_tracked) == 5
        assert distributed.all_gather_objects({"r": rank}) == [{"r": 0}, {"r": 1}]
        assert distributed.broadcast_object(f"from {rank}") == "from 0"
        assert distributed.is_main() == (rank == 0)
        progress.stderr_is_tty = lambda: True  # as on a terminal: the bar shows on rank 0 only
        with progress.Progress(True, 3, "test") as bar:
            assert bar.enabled == (rank == 0)
    finally:
        distributed.shutdown()
    assert distributed.current() is distributed.SINGLE


def test_collectives_on_two_ranks():
    """BatchNorm running statistics are averaged over the ranks (integer counters left alone);
    gathered / broadcast objects arrive in rank order; progress bars show on rank 0 only."""
    mp.start_processes(_collectives, args=(2, _free_port()), nprocs=2, start_method="fork")
    assert distributed.current() is distributed.SINGLE and distributed.all_gather_objects(3) == [3]


def test_local_batches_make_up_the_global_batch():
    """Rank r's images are r, r + W, ... of the global batch, weighted so that the mean over the W
    ranks of (weight x mean over its images) is the mean over the global batch."""
    cfg = TrainConfig(dataset="digits", model="fc-deq", model_kwargs={"width": 8}, epochs=1, batch_size=7,
                      num_train=17, warmup_epochs=0, ramp_epochs=0)
    ranks = [Trainer(cfg, log=None, dist=distributed.Context(r, 3, r, "gloo")) for r in range(3)]
    for step in range(3):  # global batches of 7, 7 and 3 images
        x, y = ranks[0].batch(step)
        parts = [t.local_batch(step) for t in ranks]
        assert torch.equal(torch.cat([p[0] for p in parts]), torch.cat([x[r::3] for r in range(3)]))
        value = y.double() ** 2  # any per-image quantity
        local = [p[2] * (p[1].double() ** 2).mean() for p in parts]
        assert float(sum(local)) / 3 == pytest.approx(float(value.mean()), rel=1e-12)
    tiny = TrainConfig(dataset="digits", model="fc-deq", model_kwargs={"width": 8}, epochs=1, batch_size=5,
                       num_train=6, warmup_epochs=0, ramp_epochs=0)
    x, y, w = Trainer(tiny, log=None, dist=distributed.Context(2, 3, 2, "gloo")).local_batch(1)  # 1 image, 3 ranks
    assert len(y) == 1 and w == 0.0


def test_sharded_certification_gives_the_one_process_results(runs, tmp_path):
    ckpt = str(runs[0] / "one" / "checkpoint.pt")
    base = ["certify", ckpt] + CERTIFY
    assert one_process(base + ["--json", str(tmp_path / "one.jsonl")]) == 0
    run_ranks(base + ["--json", str(tmp_path / "two.jsonl")])
    for k in range(2):
        assert one_process(base + ["--shard", f"{k}/2", "--json", str(tmp_path / f"shard{k}.json")]) == 0
    assert one_process(["merge", str(tmp_path / "shard1.json"), str(tmp_path / "shard0.json"),
                        "--json", str(tmp_path / "merged.jsonl")]) == 0
    ref = results(tmp_path / "one.jsonl")
    summary = ref[-1]["summary"]
    assert len(ref) == 45 * 2 + 5 + 1 and summary["num_images"] == 45
    ibp, crown = summary["methods"]["ibp"], summary["methods"]["crown"]
    assert 0 < crown["evaluated"] < 45 * 2  # CROWN ran on some points, skipped others
    assert crown["linf_certified_accuracy"][1] > ibp["linf_certified_accuracy"][1] > 0  # not a vacuous comparison
    assert summary["methods"]["smoothing"]["num_images"] == 5
    assert results(tmp_path / "two.jsonl") == ref
    assert results(tmp_path / "merged.jsonl") == ref
    # a missing shard, or a shard of another run, is refused (nothing written)
    assert one_process(["merge", str(tmp_path / "shard0.json"), "--json", str(tmp_path / "x.jsonl")]) == 2
    other = ["certify", ckpt, "--num", "45", "--batch-size", "8", "--eps", "0.02", "--method", "ibp",
             "--pgd-steps", "0", "--no-progress", "--shard", "1/2", "--json", str(tmp_path / "other.json")]
    assert one_process(other) == 0
    assert one_process(["merge", str(tmp_path / "shard0.json"), str(tmp_path / "other.json"),
                        "--json", str(tmp_path / "x.jsonl")]) == 2
    assert not (tmp_path / "x.jsonl").exists()


def test_certify_under_torchrun(runs, tmp_path):
    """The real launcher: ``torchrun --standalone --nproc_per_node 2 -m lirpa_deq.cli -- certify ...``."""
    ckpt = str(runs[0] / "one" / "checkpoint.pt")
    argv = ["certify", ckpt] + CERTIFY
    assert one_process(argv + ["--json", str(tmp_path / "one.jsonl")]) == 0
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=os.pathsep.join(
        [os.path.dirname(os.path.dirname(os.path.abspath(__file__)))] + sys.path))
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                        "-m", "lirpa_deq.cli", "--"] + argv + ["--json", str(tmp_path / "run.jsonl")],
                       capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.count("certified IBP") == 1  # rank 0 alone prints the table
    assert results(tmp_path / "run.jsonl") == results(tmp_path / "one.jsonl")
