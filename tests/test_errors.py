"""Every mistake a user can make ends with one line, its documented exit status (2 usage,
3 diverged, 4 an output that cannot be written), no traceback, the data and any earlier checkpoint
byte-identical and nothing left behind. Most cases run in this process through `ddl.cli.main`;
those that need a kernel limit or several ranks, in fresh ones."""
import os
import shutil
import subprocess
from pathlib import Path

import h5py
import numpy as np
import pytest

from conftest import needs, refused, run_ddl, run_mpi, untouched
from ddl import checkpoint
from ddl.errors import OutputError
from ddl.config import Config
from ddl.train import run

JOBS = Path(__file__).with_name("mpi_jobs.py")
FAST = ["--subset", "256", "--batch-size", "64"]       # 4 steps an epoch
RECIPE = Config()


@pytest.fixture(scope="module")
def trained(small_h5, tmp_path_factory):
    """data.h5 (the small set) and c.h5, a checkpoint of 2 epochs on it with FAST options."""
    folder = tmp_path_factory.mktemp("trained")
    shutil.copy(small_h5, folder / "data.h5")
    run(Config(data=str(folder / "data.h5"), subset=256, batch_size=64, epochs=2, quiet=True,
               checkpoint=str(folder / "c.h5")))
    return folder


@pytest.fixture
def work(trained, tmp_path, monkeypatch):
    """A working folder with data.h5, c.h5 (2 epochs), m.jsonl (an earlier run's metrics), a
    symbolic and a hard link to data.h5 and a subfolder; the current folder during the test."""
    for name in ("data.h5", "c.h5"):
        shutil.copy(trained / name, tmp_path / name)
    (tmp_path / "m.jsonl").write_text("{}\n")
    (tmp_path / "link.h5").symlink_to(tmp_path / "data.h5")
    os.link(tmp_path / "data.h5", tmp_path / "hard.h5")
    (tmp_path / "sub").mkdir()
    monkeypatch.chdir(tmp_path)
    return tmp_path


def train(*args):
    return ["train", "--data", "data.h5", *FAST, "--quiet", *args]


@pytest.mark.parametrize("args, words", [
    (["--batch-size", "0"], ["--batch-size", "at least 1"]),
    (["--epochs", "0"], ["--epochs"]),
    (["--epochs", "two"], ["--epochs", "two"]),
    (["--model", "resnet"], ["unknown model", "seed-cnn"]),
    (["--optimizer", "lbfgs"], ["--optimizer", "'lbfgs' is not one of 'sgd', 'adam', 'rmsprop'"]),
    (["--schedule", "linear"], ["--schedule", "'linear' is not one of"]),
    (["--model", "nets.py"], ["name a model file and its function as FILE.py:FUNCTION"]),
    (["--model", "nope.py:make"], ["/nope.py:make: no such file ", "/nope.py"]),
    (["--shift", "-1"], ["--shift must be at least 0"]),
    (["--micro-batch", "-1"], ["--micro-batch"]),
    (["--warmup", "-3"], ["--warmup"]),
    (["--seed", "-1"], ["--seed must be at least 0"]),
    (["--lr", "0"], ["--lr must be a finite number > 0, got 0.0"]),
    (["--lr", "nan"], ["--lr", "got nan"]),
    (["--lr", "inf"], ["--lr", "got inf"]),
    (["--momentum", "-0.5"], ["--momentum must be a finite number >= 0"]),
    (["--weight-decay", "-1"], ["--weight-decay"]),
    (["--weight-decay", "inf"], ["--weight-decay", "got inf"]),
    (["--threads", "-1"], ["--threads"]),
    (["--subset", "100", "--batch-size", "128"], ["larger than the 100 training images"]),
    (["--resume"], ["--resume needs --checkpoint"]),
    (["--checkpoint", "c.h5", "--resume", "--overwrite"], ["choose one"]),
    (["--data", "nope.h5"], ["nope.h5: no such file"]),
    (["--data", "m.jsonl"], ["m.jsonl: not an HDF5 file"]),
    (["--checkpoint-every", "-1", "--checkpoint", "x.h5"], ["--checkpoint-every must be at least"]),
    (["--checkpoint-every", "5"], ["--checkpoint-every needs --checkpoint PATH"]),
    (["--checkpoint-seconds", "60"], ["--checkpoint-seconds needs --checkpoint PATH"]),
    (["--checkpoint-seconds", "inf", "--checkpoint", "x.h5"], ["--checkpoint-seconds", "got inf"]),
    (["--timeout", "-1"], ["--timeout must be a finite number >= 0, got -1.0"]),
    (["--timeout", "nan"], ["--timeout", "got nan"]),
    (["--timeline", "data.h5"], ["--timeline data.h5 is the same file as --data"]),
])
def test_bad_options(args, words, ddl, work):
    with untouched(work):
        refused(ddl(*train(*args)), 2, *words)


@pytest.mark.parametrize("args, words", [
    (["--checkpoint", "data.h5"], ["--checkpoint data.h5 is the same file as --data data.h5"]),
    (["--checkpoint", "data.h5", "--resume"], ["same file as --data"]),
    (["--metrics", "link.h5", "--overwrite"], ["--metrics link.h5 is the same file as --data"]),
    (["--plot", "hard.h5", "--overwrite"], ["--plot hard.h5 is the same file as --data"]),
    (["--checkpoint", "x.h5", "--metrics", "sub/../x.h5"], ["same file as --checkpoint x.h5"]),
    (["--checkpoint", "c.h5"], ["c.h5 already exists: pass --resume", "or --overwrite"]),
    (["--metrics", "m.jsonl"], ["m.jsonl already exists: pass --overwrite to replace it"]),
    (["--metrics", "m.jsonl", "--checkpoint", "new.h5"],
     ["m.jsonl already exists: pass --resume to go on with the run in new.h5 or --overwrite"]),
    (["--checkpoint", "sub"], ["sub is a folder"]),
    (["--checkpoint", "/no/such/dir/c.h5"], ["folder /no/such/dir does not exist"]),
    (["--plot", "curves.txt"], ["matplotlib writes", "not txt"]),
])
def test_outputs_never_clobber_inputs_or_earlier_work(args, words, ddl, work):
    with untouched(work):
        refused(ddl(*train(*args)), 2, *words)


def test_overwrite_starts_afresh(ddl, work):
    assert ddl(*train("--epochs", "1", "--checkpoint", "c.h5", "--metrics", "m.jsonl",
                      "--overwrite"))[0] == 0
    assert checkpoint.load("c.h5")["epoch"] == 1
    assert (work / "m.jsonl").read_text().count("\n") == 1
    assert sorted(os.listdir(work)) == ["c.h5", "data.h5", "hard.h5", "link.h5", "m.jsonl", "sub"]


@pytest.mark.parametrize("args, words", [
    (["--model", "mlp"], ["--resume cannot change --model (seed-cnn -> mlp)"]),
    (["--optimizer", "adam"], ["--optimizer (sgd -> adam)"]),
    (["--seed", "1", "--momentum", "0.5"], ["--momentum (0.9 -> 0.5), --seed (0 -> 1)"]),
    (["--batch-size", "32"], ["--batch-size (64 -> 32)"]),
    (["--subset", "128"], ["--subset (256 -> 128)"]),
    (["--data", "other.h5"], ["--data (another data set than"]),
    (["--epochs", "1"], ["c.h5 has already trained 2 epochs: --epochs must be at least 2"]),
])
def test_resume_refuses_what_it_cannot_change(args, words, ddl, work):
    with h5py.File(work / "other.h5", "w") as f, h5py.File(work / "data.h5") as src:
        for name in ("train", "test"):
            src.copy(name, f)
        f.attrs.update(src.attrs)
        f.attrs["mean"] = 0.2
    with untouched(work):
        refused(ddl(*train("--checkpoint", "c.h5", "--resume", "--epochs", "3", *args)), 2,
                *words)


def test_resume_applies_and_says_what_it_may_change(ddl, work):
    shutil.copy("data.h5", "moved.h5")          # the same data set elsewhere: fine
    code, output = ddl("train", "--data", "moved.h5", *FAST, "--checkpoint", "c.h5", "--resume",
                       "--epochs", "3", "--lr", "0.01", "--schedule", "constant")
    assert code == 0, output
    first, said = output.splitlines()[:2]
    assert first == ("data moved.h5: 512 train + 512 test images of 1x28x28, 10 classes (0, 1, 2, "
                     "3, 4, 5, 6, 7, 8, 9); training on a stratified subset of 256")
    assert said.startswith("resuming c.h5 after epoch 2, ")
    for change in ("--epochs 3 (was 2)", "--lr 0.01 (was 0.05)",
                   "--schedule constant (was cosine)"):
        assert change in said
    saved = checkpoint.load("c.h5")
    assert saved["epoch"] == 3 and saved["config"]["lr"] == 0.01
    assert [h["lr"] for h in saved["history"]][-1] == pytest.approx(0.01)
    code, output = ddl(*train("--checkpoint", "c.h5", "--resume", "--epochs", "3",
                              "--lr", "0.01", "--schedule", "constant"))
    assert code == 0 and output == ""                       # --quiet: nothing left to do
    with untouched(work):
        code, output = ddl("train", "--data", "data.h5", *FAST, "--checkpoint", "c.h5",
                           "--resume", "--epochs", "3", "--lr", "0.01", "--schedule", "constant")
    assert code == 0 and "nothing left to train" in output


@pytest.mark.filterwarnings("ignore::RuntimeWarning")
def test_divergence_stops_the_run_and_keeps_the_checkpoint(ddl, work):
    with untouched(work):
        refused(ddl(*train("--checkpoint", "c.h5", "--resume", "--epochs", "3", "--lr", "1e4")),
                3, "training diverged at epoch 3, step ", "c.h5 keeps epoch 2", "--debug")
        refused(ddl(*train("--checkpoint", "new.h5", "--lr", "1e4", "--metrics", "new.jsonl")),
                3, "training diverged at epoch 1, step ", "new.h5 was not written")
        refused(ddl(*train("--lr", "1e4", "--debug")), 3,
                "training diverged at epoch 1, step ", "of layer ", "produced")


def test_a_test_loss_that_overflows_stops_the_run_too(ddl, work, monkeypatch):
    """Huge but finite weights can train without a NaN step and still give logits that overflow
    in evaluation (a wide mlp at lr 1e4 on the full test set did): stand in for that."""
    monkeypatch.setattr("ddl.train.evaluate", lambda *args: (np.inf, 0.1))
    with untouched(work):
        refused(ddl(*train("--checkpoint", "c.h5", "--resume", "--epochs", "3")), 3,
                "at the end of epoch 3: the weights or the test loss turned NaN or inf",
                "c.h5 keeps epoch 2")


def _bad_data(small_h5, path, split="train", shape=None, classes=None):
    with h5py.File(small_h5) as src, h5py.File(path, "w") as f:
        f.attrs.update(src.attrs)
        for name in ("train", "test"):
            src.copy(name, f)
        if shape:
            del f[f"{split}/images"]
            f[f"{split}/images"] = np.zeros((512,) + shape, np.uint8)
        if classes:
            f.attrs["num_classes"] = classes
            f.attrs["class_names"] = [str(k) for k in range(classes)]
    return path


def test_data_must_fit_the_model_before_any_work(ddl, work, small_h5):
    """A model is built for the training images; the test images must match them, and a
    checkpoint's model must take the images it is asked to evaluate."""
    with untouched(work):
        wide = _bad_data(small_h5, work / "sub" / "wide.h5", "train", (1, 32, 32))
        refused(ddl(*train("--data", wide)), 2, "'test' holds 1x28x28 images of 10 classes, "
                "but 'train' holds 1x32x32 images of 10 classes")
        few = _bad_data(small_h5, work / "sub" / "few.h5", classes=12)
        for command in ("evaluate", "predict"):
            refused(ddl(command, "--data", few, "--checkpoint", "c.h5"), 2,
                    "'test' holds 1x28x28 images of 12 classes, but the model in c.h5 takes "
                    "1x28x28 images of 10 classes")
        test_only = _bad_data(small_h5, work / "sub" / "test.h5", "test", (3, 28, 28))
        for args in (train("--data", test_only), ("evaluate", "--data", test_only, "--checkpoint",
                                                    "c.h5")):
            refused(ddl(*args), 2, "'test/images' have 3 channel(s), but the attributes mean and "
                    "std hold 1 and 1 values")
        test_only.unlink()
        test_only = _bad_data(small_h5, work / "sub" / "test.h5", "test", (1, 32, 32))
        refused(ddl(*train("--data", test_only)), 2, "'test' holds 1x32x32 images")
        refused(ddl("predict", "--data", test_only, "--checkpoint", "c.h5"), 2,
                "'test' holds 1x32x32 images of 10 classes, but the model in c.h5 takes 1x28x28")
        tiny = _bad_data(small_h5, work / "sub" / "tiny.h5", "train", (1, 8, 8))
        _bad_data(tiny, work / "sub" / "tiny8.h5", "test", (1, 8, 8))
        refused(ddl(*train("--data", work / "sub" / "tiny8.h5")), 2,
                "seed-cnn cannot take 1x8x8 images")
        for path in (wide, few, test_only, tiny, work / "sub" / "tiny8.h5"):
            path.unlink()


def test_a_model_file_that_goes_missing_is_one_line(ddl, work):
    """The checkpoint records the user's model by its file: evaluate rebuilds it from there, once
    the user trusts it (tests/test_trust.py: not before)."""
    (work / "sub" / "net.py").write_text(
        "from ddl import nn\n\n\ndef make(in_shape, num_classes):\n"
        "    return nn.Sequential(nn.Flatten(), nn.Linear(784, num_classes))\n")
    assert ddl(*train("--model", "sub/net.py:make", "--epochs", "1", "--checkpoint",
                      "sub/n.h5"))[0] == 0
    code, output = ddl("evaluate", "--data", "data.h5", "--checkpoint", "sub/n.h5",
                       "--trust-model")
    assert code == 0 and "accuracy" in output
    (work / "sub" / "net.py").rename(work / "sub" / "moved.py")
    with untouched(work):
        refused(ddl("evaluate", "--data", "data.h5", "--checkpoint", "sub/n.h5",
                    "--trust-model"), 2,
                f"model {work}/sub/net.py:make: no such file {work}/sub/net.py")
        refused(ddl(*train("--model", "sub/moved.py:make", "--checkpoint", "sub/n.h5",
                           "--resume", "--epochs", "2")), 2,
                f"--model ({work}/sub/net.py:make -> {work}/sub/moved.py:make)")


def test_checkpoint_commands_refuse_bad_files_and_paths(ddl, work):
    with untouched(work):
        refused(ddl("evaluate", "--data", "data.h5", "--checkpoint", "data.h5"), 2,
                "data.h5: not a ddl checkpoint (a dataset)")
        refused(ddl("predict", "--data", "data.h5", "--checkpoint", "m.jsonl"), 2,
                "m.jsonl: not a ddl checkpoint")
        refused(ddl("predict", "--data", "data.h5", "--checkpoint", "c.h5", "--out", "link.h5"),
                2, "--out link.h5 is the same file as --data")


def test_a_second_job_is_locked_out(ddl, work):
    with checkpoint.Lock(work / "c.h5"), untouched(work):
        refused(ddl(*train("--checkpoint", "c.h5", "--resume", "--epochs", "3")), 2,
                "c.h5 is being written by another job (pid ")


def test_a_vanished_folder_keeps_nothing_half_written(work):
    (work / "sub" / "data.h5").write_bytes((work / "data.h5").read_bytes())
    out = work / "out"
    out.mkdir()

    def vanish(epoch, _model):
        shutil.rmtree(out)
    cfg = Config(data="data.h5", subset=256, batch_size=64, epochs=2, quiet=True,
                 checkpoint=str(out / "c.h5"))
    with pytest.raises(OutputError, match=r"cannot write .*out/c\.h5 \(No such file or dir"):
        run(cfg, on_epoch_end=vanish)
    assert not out.exists()


def test_a_nan_on_one_rank_stops_every_rank(work):
    with untouched(work):
        done = run_mpi(2, [JOBS, "nan", work / "sub",
                           *train("--checkpoint", "c.h5", "--resume", "--epochs", "3")[1:]],
                       timeout=60, cwd=work)
        refused((done.returncode, done.stdout + done.stderr), 3,
                "training diverged at epoch 3, step 2:", "c.h5 keeps epoch 2")
        assert (done.stdout + done.stderr).count("Error") == 1


def test_a_quota_stops_every_rank_and_keeps_the_checkpoint(work):
    """A file-size limit stands in for a quota: on a job of 2 ranks, the next checkpoint cannot
    be written."""
    with untouched(work):
        done = run_mpi(2, [JOBS, "quota", work / "sub", os.path.getsize("c.h5") // 2,
                           *train("--checkpoint", "c.h5", "--resume", "--epochs", "3")[1:]],
                       timeout=60, cwd=work)
        refused((done.returncode, done.stdout + done.stderr), 4,
                "cannot write c.h5 (File too large); the previous file is kept")


@pytest.fixture
def tiny_disk(tmp_path):
    """A 600 KiB tmpfs (two small checkpoints do not fit); skipped where mounting is not allowed."""
    disk = tmp_path / "disk"
    disk.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=600k", "tmpfs", str(disk)],
                             capture_output=True)
    if mounted.returncode:
        needs("mount", f"cannot mount a tmpfs here: {mounted.stderr.decode().strip()}")
    yield disk
    subprocess.run(["umount", str(disk)], check=True)


def test_a_full_disk_keeps_the_checkpoint(ddl, work, tiny_disk):
    shutil.copy(work / "c.h5", tiny_disk / "c.h5")
    with untouched(tiny_disk):
        refused(ddl(*train("--checkpoint", tiny_disk / "c.h5", "--resume", "--epochs", "3")), 4,
                "c.h5 (No space left on device); the previous file is kept")


def test_a_full_disk_keeps_the_data_file(ddl, tmp_path, tiny_disk):
    """The dataset streams into its file: HDF5 never sees the failed write (it would crash the
    interpreter), the conversion stops at the next chunk, and the previous file is kept."""
    rng = np.random.default_rng(0)
    x, y = rng.integers(0, 256, (1000, 3, 16, 16), dtype=np.uint8), np.arange(1000) % 5
    np.savez(tmp_path / "small.npz", x_train=x[:50], y_train=y[:50], x_test=x[:10], y_test=y[:10])
    np.savez(tmp_path / "big.npz", x_train=x, y_train=y, x_test=x[:100], y_test=y[:100])
    assert ddl("prepare", "--npz", tmp_path / "small.npz", "--out", tiny_disk / "d.h5")[0] == 0
    with untouched(tiny_disk):
        refused(ddl("prepare", "--npz", tmp_path / "big.npz", "--out", tiny_disk / "d.h5"), 4,
                "d.h5 (No space left on device); the previous file is kept")


@pytest.mark.parametrize("args, words", [
    (["--npz", "a.npz", "--raw", "raw"], ["--raw and --npz: give one source"]),
    (["--npz", "a.npz", "--download"], ["--no-verify and --download are for --raw"]),
    (["--npz", "nope.npz"], ["nope.npz: no such file"]),
    (["--image-folder", "nowhere"], ["nowhere: no such folder"]),
    (["--npz", "a.npz", "--out", "a.npz"], ["--out a.npz is the same file as --npz a.npz"]),
])
def test_prepare_refuses_bad_sources(args, words, ddl, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    np.savez("a.npz", x_train=np.zeros((2, 4, 4), np.uint8), y_train=[0, 1],
             x_test=np.zeros((2, 4, 4), np.uint8), y_test=[0, 1])
    with untouched(tmp_path):
        refused(ddl("prepare", *args), 2, *words)


@pytest.mark.parametrize("lines, words", [
    ("localhost:-1\n", ["line 1: slots '-1' is not a positive number"]),
    ("localhost slots=0\n", ["line 1: slots '0' is not a positive number"]),
    ("# hosts\nlocalhost:2\nnode one\n", ["line 3: 'node one' is not `host`, `host:N`"]),
    ("node1\nnode2 slots 2\n", ["line 2: 'node2 slots 2' is not"]),
    ("node_1;rm:2\n", ["'node_1;rm:2' is not `host`"]),
    ("", ["lists no hosts"]),
    ("# nothing but a comment\n\n", ["lists no hosts"]),
])
def test_launch_checks_the_hostfile(lines, words, ddl, tmp_path):
    (tmp_path / "hosts").write_text(lines)
    with untouched(tmp_path):
        refused(ddl("launch", "-n", "2", "--hostfile", tmp_path / "hosts", "--", "train"), 2,
                *words)


def test_launch_checks_the_mpiexec(ddl):
    refused(ddl("launch", "-n", "2", "--mpiexec", "/bin/false", "--", "train"), 2,
            "/bin/false does not look like an MPI launcher", "exited 1")
    refused(ddl("launch", "-n", "2", "--mpiexec", "/no/mpiexec", "--", "train"), 2,
            "/no/mpiexec: not found")
    refused(ddl("launch", "-n", "2", "--hostfile", "/no/hosts", "--", "train"), 2, "/no/hosts")


@pytest.mark.parametrize("args, words", [
    (["--checkpoint", "c.h5"], ["c.h5 already exists"]),                   # found by rank 0
    (["--batch-size", "63"], ["does not divide by the 2 ranks"]),           # by every rank
    (["--data", "nope.h5"], ["nope.h5: no such file"]),
])
def test_usage_errors_under_mpi_print_once(args, words, work):
    with untouched(work):
        done = run_ddl(train(*args), n=2)
        refused((done.returncode, done.stdout + done.stderr), 2, *words)
        assert (done.stdout + done.stderr).count("Error") == 1
