"""The ``lirpa-deq`` command: train -> checkpoint -> resume -> certify -> JSON end to end (the
certified set checked against PGD), smoothing and demo runs, and one-line errors."""
import json
import os
import subprocess
import sys

import pytest
import torch

from lirpa_deq.cli import main
from lirpa_deq.cli.methods import lipschitz_status
from lirpa_deq.data import get_dataset
from lirpa_deq.testing import pgd_extremes
from lirpa_deq.training import load_checkpoint, margin_spec, model_from_checkpoint, pgd_robust

TRAIN = ["train", "--dataset", "digits", "--model", "fc-deq", "--width", "32", "--num-train", "512",
         "--batch-size", "64", "--epochs", "5", "--warmup-epochs", "1", "--ramp-epochs", "2", "--eps-train", "0.05",
         "--lr", "5e-3", "--no-progress"]


def call_main(argv):
    """main(argv) with torch's thread count restored afterwards (main sets --threads, default 1);
    argparse errors arrive as SystemExit and are returned as the exit code."""
    n = torch.get_num_threads()
    try:
        return main(argv)
    except SystemExit as exc:
        return exc.code
    finally:
        torch.set_num_threads(n)


def run(argv, capsys):
    """main(argv) -> (exit code, stdout, stderr)."""
    rc = call_main(argv)
    out, err = capsys.readouterr()
    return rc, out, err


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A small IBP-trained fc DEQ on digits: 2 steps short of the end, then resumed to the end."""
    out = tmp_path_factory.mktemp("run")
    assert call_main(TRAIN + ["--out", str(out), "--max-steps", "36"]) == 0
    assert load_checkpoint(out / "checkpoint.pt")["step"] == 36
    assert call_main(TRAIN + ["--out", str(out), "--resume"]) == 0
    return out / "checkpoint.pt"


def test_train_resume_certify_json(trained, tmp_path, capsys):
    data = load_checkpoint(trained)
    assert data["step"] == 40 and data["config"]["dataset"] == "digits"
    js = tmp_path / "cert.jsonl"
    eps = [0.0, 0.01, 0.03]
    rc, out, err = run(["certify", str(trained), "--num", "60", "--eps", *map(str, eps), "--method", "ibp", "crown",
                        "--all-points", "--pgd-steps", "10", "--json", str(js), "--no-progress"], capsys)
    assert rc == 0, err
    assert "certified IBP" in out and "certified CROWN (with IBP)" in out and "PGD accuracy" in out
    lines = [json.loads(line) for line in js.read_text().splitlines()]
    records, summary = lines[:-1], lines[-1]["summary"]
    assert len(records) == 60 * len(eps) and summary["num_images"] == 60
    assert summary["certified_but_attacked"] == {"ibp": 0, "crown": 0}
    ibp, crown = summary["methods"]["ibp"], summary["methods"]["crown"]
    assert all(c >= i for c, i in zip(crown["linf_certified_accuracy"], ibp["linf_certified_accuracy"]))
    assert ibp["linf_certified_accuracy"][0] == pytest.approx(summary["clean_accuracy"])  # eps = 0: exact
    assert crown["linf_certified_accuracy"][1] > 0.2
    for r in records:
        assert set(r) >= {"index", "label", "prediction", "eps", "certified_by", "certified", "margin_lower"}
        for m in ("ibp", "crown"):
            assert r["certified"][m] == (r["margin_lower"][m] > 0)
        if r["certified_by"] is not None:
            assert r["prediction"] == r["label"] and r["pgd_robust"]
    # independent, stronger attack on every certified point: PGD per margin (pgd_extremes) and
    # CE-margin PGD with restarts; a certified point must never be broken
    model = model_from_checkpoint(load_checkpoint(trained)).double()
    test = get_dataset("digits", "test")
    for e in eps[1:]:
        cert = [r for r in records if r["eps"] == e and r["certified_by"]]
        assert cert, f"nothing certified at eps={e}"
        idx = torch.tensor([r["index"] for r in cert])
        x, y = test.tensors[0][idx].double(), test.tensors[1][idx]
        assert bool(pgd_robust(model, x, y, e, steps=40, restarts=3).all())
        C = margin_spec(y, 10).double()

        def margins(z):  # (r * B, ...) -> (r * B, 9); pgd_extremes stacks the batch r times
            return torch.einsum("bkc,bc->bk", C.repeat(z.shape[0] // len(C), 1, 1), model(z.clamp(0, 1)))

        lo, _ = pgd_extremes(margins, x, e, steps=20)
        with torch.no_grad():
            worst = torch.stack([torch.einsum("bkc,bc->bk", C, model(lo[0, k].clamp(0, 1)))[:, k]
                                 for k in range(9)], 1)
        assert bool((worst > 0).all())
        lower = torch.tensor([r["margin_lower"]["crown"] for r in cert], dtype=torch.float64)
        assert bool((worst.min(1).values >= lower - 1e-5).all())  # the margin bound holds too


def test_certify_smoothing_json_stdout(trained, capsys):
    rc, out, err = run(["certify", str(trained), "--num", "4", "--method", "smoothing", "--sigma", "0.25",
                        "--n", "60", "--n0", "10", "--alpha", "0.01", "--radii", "0", "0.1", "--json", "-",
                        "--pgd-steps", "0", "--no-progress"], capsys)
    assert rc == 0, err
    lines = [json.loads(line) for line in out.splitlines()]
    assert "certified smoothing*" in err  # the table goes to stderr when JSON goes to stdout
    sm = [r for r in lines[:-1] if r.get("method") == "smoothing"]
    assert len(sm) == 4 and all(r["radius"] >= 0 and r["smoothed_prediction"] >= -1 for r in sm)
    res = lines[-1]["summary"]["methods"]["smoothing"]
    assert res["radii"] == [0.0, 0.1] and res["num_images"] == 4 and res["seconds_per_image"] > 0
    rc, _, err = run(["certify", str(trained), "--num", "2", "--method", "smoothing", "--n", "10", "--n0", "1",
                      "--srs-steps", "1", "--pgd-steps", "0", "--no-progress"], capsys)
    assert rc == 0, err


def test_certify_lipschitz_or_clear_error(trained, capsys):
    argv = ["certify", str(trained), "--num", "3", "--eps", "0.01", "--method", "lipschitz", "--pgd-steps", "5",
            "--no-progress"]
    rc, out, err = run(argv, capsys)
    if lipschitz_status()[0]:
        assert rc == 0 and "certified Lipschitz" in out, err
    else:
        assert rc == 2 and err.strip().count("\n") == 0 and "lipschitz' is unavailable" in err


def test_demo_runs_and_reuses_its_model(tmp_path, capsys):
    argv = ["demo", "--out", str(tmp_path), "--epochs", "0.02", "--num-test", "20", "--eps", "0.01", "0.05",
            "--smoothing-num", "2", "--smoothing-n", "30", "--lipschitz-num", "0", "--no-progress"]
    rc, out, err = run(argv, capsys)
    assert rc == 0, err
    assert "training conv-fc-deq" in out and "clean accuracy" in out and "certified IBP" in out
    assert {"model.pt", "results.json", "certified.png"} <= set(os.listdir(tmp_path))
    res = json.loads((tmp_path / "results.json").read_text())
    assert res["eps"] == [0.01, 0.05] and set(res["methods"]) == {"ibp", "crown", "smoothing"}
    rc, out, err = run(argv, capsys)
    assert rc == 0 and "reusing the trained model" in out, err


# ------------------------------------------------------------------------------------ errors
def _one_line_error(rc, err, *needles):
    assert rc == 2
    lines = [line for line in err.strip().splitlines() if line.strip()]
    assert len(lines) == 1, err
    assert "Traceback" not in err and lines[0].startswith("lirpa-deq") and "error" in lines[0]
    for n in needles:
        assert n in lines[0], lines[0]


@pytest.mark.parametrize("argv,needle", [
    (["train", "--dataset", "nope"], "invalid choice: 'nope'"),
    (["train", "--model", "nope"], "invalid choice: 'nope'"),
    (["train", "--method", "pgd"], "invalid choice: 'pgd'"),
    (["train", "--eps-train", "-0.1"], "must be a finite number >= 0"),
    (["certify", "x.pt", "--eps", "-0.1"], "must be a finite number >= 0"),
    (["certify", "x.pt", "--method", "magic"], "invalid choice: 'magic'"),
    (["certify", "x.pt", "--alpha", "2"], "must be in (0, 1)"),
    (["certify", "x.pt", "--shard", "2/2"], "expected K/N with 0 <= K < N, got '2/2'"),
    (["certify", "x.pt", "--shard", "half"], "expected K/N (shard K of N"),
    (["certify", "x.pt", "--shard", "0/2"], "--shard K/N writes its share of the results to a shard file"),
    (["merge", "missing.json"], "shard file 'missing.json' does not exist"),
    (["frobnicate"], "invalid choice"),
])
def test_usage_errors_one_line(argv, needle, capsys):
    rc, _, err = run(argv, capsys)
    _one_line_error(rc, err, needle)


def test_runtime_errors_one_line(trained, tmp_path, capsys):
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"\x00garbage")
    cases = [
        (["certify", str(tmp_path / "missing.pt")], "does not exist"),
        (["certify", str(bad)], "corrupt"),
        (["train", "--dataset", "mnist", "--out", str(tmp_path / "a")], "--data-root"),
        (["train", "--dataset", "cifar10", "--data-root", str(tmp_path / "nowhere"), "--out", str(tmp_path / "b")],
         "not a directory"),
        (["certify", str(trained), "--dataset", "mnist5k"], "expects (1, 8, 8)"),
        (["certify", str(trained), "--dataset", "mnist", "--data-root", str(tmp_path)], "could not find"),
        (["certify", str(trained), "--dataset", "mnist"], "pass --data-root"),
        (TRAIN + ["--out", str(trained.parent)], "exists: pass --resume"),
        (TRAIN[:6] + ["48"] + TRAIN[7:] + ["--out", str(trained.parent), "--resume"], "does not match"),
    ]
    for argv, needle in cases:
        rc, _, err = run(argv, capsys)
        _one_line_error(rc, err, needle)


def test_console_entry_point_subprocess(tmp_path):
    """``python -m lirpa_deq.cli``: --help, and an error without a traceback."""
    env = dict(os.environ, OMP_NUM_THREADS="1")
    r = subprocess.run([sys.executable, "-m", "lirpa_deq.cli", "--help"], capture_output=True, text=True,
                       env=env, timeout=120)
    assert r.returncode == 0 and "usage: lirpa-deq" in r.stdout and "{train,certify,merge,demo}" in r.stdout
    r = subprocess.run([sys.executable, "-m", "lirpa_deq.cli", "certify", str(tmp_path / "none.pt")],
                       capture_output=True, text=True, env=env, timeout=120)
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert r.stderr.strip().splitlines()[-1].startswith("lirpa-deq: error: checkpoint")


@pytest.mark.parametrize("sub,flags", [
    ("train", ["--dataset", "--model", "--method", "--eps-train", "--epochs", "--out", "--resume"]),
    ("certify", ["--eps", "--method", "--sigma", "--n", "--n0", "--alpha", "--srs-steps", "--json", "--batch-size",
                 "--device", "--shard"]),
    ("merge", ["SHARD_FILE", "--json"]),
    ("demo", ["--out", "--retrain", "--eps", "--num-test"]),
])
def test_subcommand_help(sub, flags, capsys):
    rc, out, _ = run([sub, "--help"], capsys)
    assert rc == 0 and out.startswith(f"usage: lirpa-deq {sub}")
    for f in flags:
        assert f in out


# ------------------------------------------------------------------------------------ refused input
def _no_work_done(out):
    assert "clean accuracy" not in out and "training " not in out and "epoch" not in out, out


def test_unwritable_outputs_fail_before_the_work(trained, tmp_path, capsys):
    """Before: the work ran to the end and the results were lost with a traceback."""
    afile = tmp_path / "afile"
    afile.write_text("not a directory")
    cases = [
        (["certify", str(trained), "--num", "4", "--json", str(afile / "cert.jsonl"), "--no-progress"],
         f"--json '{afile / 'cert.jsonl'}' cannot be written: its directory '{afile}' is not writable"),
        (["certify", str(trained), "--num", "4", "--json", str(tmp_path), "--no-progress"], "is a directory"),
        (TRAIN + ["--out", str(afile / "run")], f"--out '{afile / 'run'}' is not a writable directory"),
        (TRAIN + ["--out", str(afile)], f"--out '{afile}' is not a writable directory (File exists)"),
        (["demo", "--out", str(afile), "--epochs", "0.02", "--num-test", "4", "--no-progress"],
         "is not a writable directory"),
    ]
    for argv, needle in cases:
        rc, out, err = run(argv, capsys)
        _one_line_error(rc, err, needle)
        _no_work_done(out)
    assert afile.read_text() == "not a directory"


def test_json_written_atomically_and_replaces(trained, tmp_path, capsys):
    js = tmp_path / "sub" / "cert.jsonl"  # the directory is created
    argv = ["certify", str(trained), "--num", "3", "--eps", "0.01", "--method", "ibp", "--pgd-steps", "2",
            "--json", str(js), "--no-progress"]
    for _ in range(2):
        rc, _, err = run(argv, capsys)
        assert rc == 0, err
    assert os.listdir(js.parent) == ["cert.jsonl"]  # no temporary or probe file left
    assert len(js.read_text().splitlines()) == 3 + 1


def test_bad_checkpoints_refused_with_advice(trained, tmp_path, capsys):
    raw = trained.read_bytes()
    trunc = tmp_path / "run" / "checkpoint.pt"
    trunc.parent.mkdir()
    trunc.write_bytes(raw[: len(raw) // 2])
    data = load_checkpoint(trained)
    key = next(k for k, v in data["model_state"].items() if v.is_floating_point())
    data["model_state"][key].view(-1)[0] = float("nan")
    nan = tmp_path / "nan.pt"
    torch.save(data, nan)
    cases = [
        (["certify", str(trunc), "--no-progress"], "is corrupt, truncated or not a torch file"),
        (TRAIN + ["--out", str(trunc.parent), "--resume"], "delete it and train again, or use another checkpoint "
                                                          "(lirpa-deq train: another --out)"),
        (["certify", str(nan), "--no-progress"], f"has NaN / inf weights ('{key}'): it cannot be evaluated"),
        (TRAIN + ["--out", str(tmp_path / "r2"), "--resume", str(nan)], "NaN / inf weights"),
    ]
    for argv, needle in cases:
        rc, out, err = run(argv, capsys)
        _one_line_error(rc, err, needle)
        _no_work_done(out)


def test_smoothing_sample_sizes_checked_up_front(trained, capsys):
    rc, out, err = run(["certify", str(trained), "--num", "4", "--method", "ibp", "smoothing", "--n", "10",
                        "--n0", "100", "--no-progress"], capsys)
    _one_line_error(rc, err, "n (estimation samples, 10) must be >= n0 (selection samples, 100)")
    _no_work_done(out)


def test_short_training_fits_the_ramp(tmp_path, capsys):
    """Before: --epochs 2 with the default 1 + 5-epoch ramp ended at eps 0.005, silently."""
    argv = ["train", "--dataset", "digits", "--model", "fc-deq", "--width", "8", "--num-train", "128",
            "--batch-size", "64", "--epochs", "2", "--eps-train", "0.05", "--no-progress", "--out", str(tmp_path)]
    rc, out, err = run(argv, capsys)
    assert rc == 0, err
    warning = [line for line in out.splitlines() if line.startswith("warning:")]
    assert len(warning) == 1 and "shrunk to 0 + 2 steps" in warning[0] and "eps_train=0.05" in warning[0]
    epochs = [line for line in out.splitlines() if line.startswith("epoch ")]
    assert len(epochs) == 2 and "eps=0.050" in epochs[-1], out  # the last epoch trains at --eps-train
