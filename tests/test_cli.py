"""The `ddl` command as a user meets it: debug mode, launch, evaluate, predict, their own data and
model, and the example script (their errors: test_errors.py)."""
import json
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from conftest import ROOT, rank_env, refused, run_ddl, run_mpi
from ddl.config import Config
from ddl.errors import Diverged
from ddl.train import run

QUICK = ["--subset", "256", "--batch-size", "64", "--epochs", "1", "--quiet"]


def test_the_options_are_config_s_fields():
    """`ddl train` has one option per Config field, with its flag and default, and --threads;
    `ddl launch` reads a train command line with the same declaration."""
    import dataclasses
    from ddl import cli, config
    options = {p.name: p for p in cli.train.params}
    fields = dataclasses.fields(Config)
    assert set(options) == {f.name for f in fields} | {"threads"}
    for f in fields:
        assert options[f.name].opts == [config.flag(f.name)]
        assert options[f.name].default == f.default, f.name
    assert options["optimizer"].type.choices == tuple(config.OPTIMIZERS)
    args = ["--threads", "2", "--checkpoint=c.h5", "--epochs", "x", "--resume", "--lr", "0.1"]
    assert config.given(args) == dict(checkpoint="c.h5", resume=True, lr=0.1)
    assert config.given(["--checkpoint"]) == {}


def test_a_named_model_s_recipe_fills_what_the_command_line_leaves(monkeypatch):
    """resnet-mini trains with its own recipe where the flags say nothing, a flag wins over it
    (even one that repeats seed-cnn's default), and other models keep the declared defaults."""
    from click.testing import CliRunner
    from ddl import cli, config, train
    seen = []
    monkeypatch.setattr(train, "run", lambda cfg, comm: seen.append(cfg))
    recipe = config.RECIPES["resnet-mini"]
    for args in (["--model", "resnet-mini"], ["--model", "resnet-mini", "--lr", "0.05"],
                 ["--model", "ref-cnn"]):
        result = CliRunner().invoke(cli.cli, ["train", *args], catch_exceptions=False)
        assert result.exit_code == 0, result.output
    mini, mini_lr, ref = seen
    assert {name: getattr(mini, name) for name in recipe} == recipe
    assert mini_lr.lr == 0.05 and mini_lr.epochs == recipe["epochs"]
    assert ref == Config(model="ref-cnn")
    assert recipe["epochs"] != Config.epochs and recipe["lr"] != Config.lr


def test_the_start_line_says_when_a_warm_up_outlasts_the_run():
    """resnet-mini's recipe warms up for 200 steps: on a small dataset that can be the whole run,
    and the start line says so rather than training at a fraction of the rate unannounced."""
    from ddl.train import lr_words
    cfg = Config(lr=0.2, warmup=200, weight_decay=5e-4)
    assert lr_words(cfg, 201) == ("sgd lr 0.2, weight decay 0.0005, 200 warm-up steps, cosine "
                                  "schedule")
    assert lr_words(cfg, 200) == ("sgd lr 0.2, weight decay 0.0005, 200 warm-up steps (not over "
                                  "within the run's 200: lr 0.2 is never reached), cosine schedule")
    assert lr_words(Config(), 10) == "sgd lr 0.05, cosine schedule"


def test_debug_names_the_first_non_finite_layer(mnist_h5):
    cfg = Config(data=str(mnist_h5), subset=256, batch_size=64, epochs=1, lr=1e12, momentum=0,
                 schedule="constant", quiet=True, debug=True)
    with pytest.raises(Diverged, match=r"epoch 1, step \d+: (forward|backward) of layer \d+ \("):
        run(cfg)


def test_debug_names_a_layer_inside_a_residual_block(colour_h5):
    cfg = Config(model="resnet-mini", data=str(colour_h5), batch_size=64, epochs=1, lr=1e12,
                 momentum=0, schedule="constant", quiet=True, debug=True)
    with pytest.raises(Diverged, match=r"epoch 1, step \d+: (forward|backward) of layer "
                                       r"\d+(\.\w+)* \(\w+\("):
        run(cfg)


def test_train_evaluate_predict(mnist_h5, tmp_path):
    ckpt, metrics, curves, picture = (tmp_path / n for n in
                                      ("c.h5", "m.jsonl", "curves.png", "digit.png"))
    done = run_ddl(["train", "--data", mnist_h5, "--subset", "2048", "--batch-size", "64",
                    "--epochs", "2", "--checkpoint", ckpt, "--metrics", metrics,
                    "--plot", curves, "--weight-decay", "1e-4", "--warmup", "5"])
    assert done.returncode == 0, done.stderr
    assert "32 per rank" not in done.stderr and "64 per rank" in done.stderr
    # the start line names what shapes the learning rate (a recipe sets some of it unasked)
    assert "sgd lr 0.05, weight decay 0.0001, 5 warm-up steps, cosine schedule" in done.stderr
    assert "epoch 2/2: train loss" in done.stderr
    records = [json.loads(line) for line in metrics.read_text().splitlines()]
    assert [r["epoch"] for r in records] == [1, 2]
    for key in ("train_loss", "test_loss", "test_accuracy", "images_per_second", "seconds",
                "world_size"):
        assert key in records[0]
    assert curves.read_bytes()[:4] == b"\x89PNG"

    done = run_ddl(["evaluate", "--data", mnist_h5, "--checkpoint", ckpt])
    assert done.returncode == 0, done.stderr
    assert f"accuracy {100 * records[-1]['test_accuracy']:.2f}%" in done.stdout

    done = run_ddl(["predict", "--data", mnist_h5, "--checkpoint", ckpt, "--index", "0",
                    "--out", picture])
    assert done.returncode == 0, done.stderr
    assert "test image 0: predicted" in done.stdout and "(label 7," in done.stdout
    assert picture.read_bytes()[:4] == b"\x89PNG"
    done = run_ddl(["predict", "--data", mnist_h5, "--checkpoint", ckpt, "--index", "10000"])
    refused((done.returncode, done.stdout + done.stderr), 2, "--index 10000")


def test_launch_runs_the_job_and_returns_its_code(mnist_h5, tmp_path):
    done = run_ddl(["launch", "-n", "2", "--", "train", "--data", mnist_h5, *QUICK,
                    "--metrics", tmp_path / "m.jsonl"])
    assert done.returncode == 0, done.stderr
    assert json.loads((tmp_path / "m.jsonl").read_text())["world_size"] == 2
    done = run_ddl(["launch", "-n", "2", "--", "train", "--data", mnist_h5, "--batch-size", "7"])
    assert done.returncode == 2


def test_launch_with_a_hostfile(mnist_h5, tmp_path):
    """Open MPI's spelling, which Hydra's mpiexec cannot read: ddl launch translates it."""
    hosts = tmp_path / "hosts"
    hosts.write_text("localhost slots=2\n")
    done = run_ddl(["launch", "-n", "2", "--hostfile", hosts, "--", "train", "--data", mnist_h5,
                    *QUICK, "--metrics", tmp_path / "m.jsonl"])
    assert done.returncode == 0, done.stderr
    assert json.loads((tmp_path / "m.jsonl").read_text())["world_size"] == 2


def test_hostfiles_in_either_spelling(tmp_path):
    from ddl.launch import read_hostfile
    hosts = tmp_path / "hosts"
    hosts.write_text("# rack 1\nnode1:4\nnode2 slots=2  # the small one\n\nnode3\n")
    assert read_hostfile(hosts) == [("node1", 4), ("node2", 2), ("node3", None)]


def test_launch_forwards_ctrl_c(mnist_h5, tmp_path):
    proc = subprocess.Popen(
        [sys.executable, "-m", "ddl", "launch", "-n", "2", "--", "train", "--data", str(mnist_h5),
         "--subset", "12800", "--epochs", "50", "--metrics", str(tmp_path / "m.jsonl")],
        env=rank_env(), stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
        text=True)
    try:
        deadline = time.monotonic() + 60
        while not (tmp_path / "m.jsonl").exists():          # the first epoch has ended
            assert time.monotonic() < deadline and proc.poll() is None, "job never got going"
            time.sleep(0.2)
        proc.send_signal(signal.SIGINT)
        sent = time.monotonic()
        _, err = proc.communicate(timeout=30)
        assert proc.returncode == 130, err
        assert time.monotonic() - sent < 15, err
    finally:
        if proc.poll() is None:
            proc.kill()


def test_micro_batches_give_the_same_training(mnist_h5):
    """A rank's batch in slices of 16 or at once: the same steps, up to float rounding."""
    runs = []
    for micro in (0, 16):
        cfg = Config(data=str(mnist_h5), subset=512, batch_size=128, epochs=1, micro_batch=micro,
                     quiet=True)
        history, model = run(cfg)
        runs.append((history[0], np.concatenate([p.data.ravel() for p in model.parameters()])))
    (h0, w0), (h1, w1) = runs
    np.testing.assert_allclose(w1, w0, rtol=0, atol=1e-5 * np.abs(w0).max())
    assert h1["train_loss"] == pytest.approx(h0["train_loss"], rel=1e-5)


EXAMPLE = ROOT / "examples" / "custom_model.py"


def test_your_own_data_and_model(colour_folder, tmp_path):
    """Images in class folders and a model file: prepare, train (the model recorded in the
    checkpoint), then evaluate and predict with the checkpoint and the data, which names the
    classes, once the user trusts the model file (by naming it, or with --trust-model)."""
    data, ckpt = tmp_path / "colours.h5", tmp_path / "c.h5"
    done = run_ddl(["prepare", "--image-folder", colour_folder, "--out", data])
    assert done.returncode == 0 and "4 classes, 3x32x32 images" in done.stdout, done.stderr
    done = run_ddl(["train", "--data", data, "--model", f"{EXAMPLE}:make_model", "--epochs", "3",
                    "--batch-size", "32", "--shift", "2", "--flip", "--checkpoint", ckpt])
    assert done.returncode == 0, done.stderr
    assert "make_model for 3x32x32 images of 4 classes" in done.stderr
    done = run_ddl(["evaluate", "--data", data, "--checkpoint", ckpt, "--model",
                    f"{EXAMPLE}:make_model"])
    assert done.returncode == 0 and "(128 images, 1 rank(s))" in done.stdout, done.stderr
    accuracy = float(done.stdout.split("accuracy ")[1].split("%")[0])
    assert accuracy > 50, done.stdout
    done = run_ddl(["predict", "--data", data, "--checkpoint", ckpt, "--index", "127",
                    "--out", tmp_path / "p.png", "--trust-model"])
    assert done.returncode == 0, done.stderr
    assert "(label ship, p=" in done.stdout and "cat:" in done.stdout and "frog:" in done.stdout
    assert (tmp_path / "p.png").read_bytes()[:4] == b"\x89PNG"


def test_the_example_script_trains_under_mpi(colour_h5):
    done = run_mpi(2, [EXAMPLE, colour_h5, "3"], timeout=120)
    assert done.returncode == 0, done.stderr
    lines = done.stdout.strip().splitlines()
    assert [line.split(":")[0] for line in lines] == ["epoch 1", "epoch 2", "epoch 3"]
    assert float(lines[-1].split("accuracy ")[1].rstrip("%")) > 50, lines
