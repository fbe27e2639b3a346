"""A user's own data set, end to end, with no silent surprises: a checkpoint knows its data (path,
class names, fingerprint) and refuses other data in one line; --subset draws a sample that
represents every class, the same at any world size; one class numbering per data set."""
import os
import shutil
from pathlib import Path

import h5py
import numpy as np
import pytest

from conftest import COLOURS, refused, untouched
from ddl import checkpoint
from ddl.config import Config
from ddl.data import DistributedSampler, subset_rows
from ddl.train import run

QUICK = ["--model", "mlp", "--batch-size", "64", "--epochs", "1", "--quiet"]


@pytest.fixture(scope="module")
def own(colour_h5, colour_folder_h5, tmp_path_factory):
    """A folder with colours.h5 (from the .npz: classes "0".."3"), folder.h5 (the same images from
    the image folder: classes cat, dog, frog, ship), relabelled.h5 (colours.h5's pixels, its
    labels rolled by one) and c.h5, a checkpoint of one epoch on colours.h5."""
    folder = tmp_path_factory.mktemp("own")
    shutil.copy(colour_h5, folder / "colours.h5")
    shutil.copy(colour_folder_h5, folder / "folder.h5")
    shutil.copy(colour_h5, folder / "relabelled.h5")
    with h5py.File(folder / "relabelled.h5", "r+") as f:
        for split in ("train", "test"):
            f[f"{split}/labels"][...] = (f[f"{split}/labels"][...] + 1) % len(COLOURS)
    run(Config(data=str(folder / "colours.h5"), model="mlp", batch_size=64, epochs=1, quiet=True,
               checkpoint=str(folder / "c.h5")))
    return folder


@pytest.fixture
def work(own, tmp_path, monkeypatch):
    for path in own.iterdir():
        shutil.copy(path, tmp_path / path.name)
    monkeypatch.chdir(tmp_path)
    return tmp_path


def test_the_checkpoint_records_its_data(own):
    data = checkpoint.load(own / "c.h5")["data"]
    assert data["path"] == str(own / "colours.h5")
    assert data["class_names"] == ["0", "1", "2", "3"] and data["classes"] == 4
    assert len(data["fingerprint"]) == 32 and (data["train"], data["test"]) == (256, 128)


def test_evaluate_and_predict_take_the_recorded_data(ddl, work, own):
    with untouched(own), untouched(work):
        code, output = ddl("evaluate", "--checkpoint", "c.h5")
        assert code == 0 and "(128 images, 1 rank(s))" in output, output
        code, with_data = ddl("evaluate", "--checkpoint", "c.h5", "--data", "colours.h5")
        assert code == 0 and with_data == output       # a copy elsewhere is the same data set
        code, output = ddl("predict", "--checkpoint", "c.h5", "--index", "3")
        assert code == 0 and output.startswith("test image 3: predicted "), output


def test_other_data_is_refused_in_one_line(ddl, work):
    with untouched(work):
        for command in ("evaluate", "predict"):
            # the same pixels, labelled otherwise: the fingerprint differs
            refused(ddl(command, "--checkpoint", "c.h5", "--data", "relabelled.h5"), 2,
                    "relabelled.h5 is not the data set c.h5 was trained on", "labels or images",
                    "--other-data")
            # the same images from a folder: numbered by the folders' names
            for other in ([], ["--other-data"]):
                refused(ddl(command, "--checkpoint", "c.h5", "--data", "folder.h5", *other), 2,
                        "its classes (cat, dog, frog, ship) are not those that c.h5 was trained "
                        "on (0, 1, 2, 3)")
        code, output = ddl("evaluate", "--checkpoint", "c.h5", "--data", "relabelled.h5",
                           "--other-data")
        assert code == 0 and "accuracy" in output, output


def test_a_checkpoint_without_its_data_file_is_one_line(ddl, work):
    state = checkpoint.load("c.h5")
    state["data"]["path"] = str(work / "gone.h5")
    checkpoint.save("moved.h5", state)
    with untouched(work):
        refused(ddl("evaluate", "--checkpoint", "moved.h5"), 2, "gone.h5: no such file")


def test_an_older_checkpoint_still_evaluates(ddl, work):
    """Before checkpoints recorded their data: the path the run was given, and no names or
    fingerprint to compare; the sizes and pixel statistics still are."""
    state = checkpoint.load("c.h5")
    for key in ("path", "class_names", "fingerprint"):
        del state["data"][key]
    state["config"]["data"] = "colours.h5"
    checkpoint.save("old.h5", state)
    with untouched(work):
        code, output = ddl("evaluate", "--checkpoint", "old.h5")
        assert code == 0 and "(128 images" in output, output
        shutil.copy("colours.h5", "brighter.h5")
        with h5py.File("brighter.h5", "r+") as f:
            f.attrs["mean"] = f.attrs["mean"] + 0.1
        refused(ddl("evaluate", "--checkpoint", "old.h5", "--data", "brighter.h5"), 2,
                "brighter.h5 is not the data set old.h5 was trained on", "pixel statistics")
        os.unlink("brighter.h5")


def test_resume_takes_the_recorded_data_and_refuses_a_relabelled_copy(ddl, work, own):
    with untouched(work):
        refused(ddl("train", *QUICK, "--checkpoint", "c.h5", "--resume", "--epochs", "2",
                    "--data", "relabelled.h5"), 2,
                "--resume cannot change --data (another data set than", "fingerprint")
        refused(ddl("train", *QUICK, "--checkpoint", "c.h5", "--resume", "--epochs", "2",
                    "--data", "folder.h5"), 2, "class_names")
    code, output = ddl("train", *QUICK[:-1], "--checkpoint", "c.h5", "--resume", "--epochs", "2")
    assert code == 0, output
    assert output.splitlines()[0].startswith(f"data {own / 'colours.h5'}: 256 train + 128 test "
                                             f"images of 3x32x32, 4 classes (0, 1, 2, 3)")
    assert checkpoint.load("c.h5")["epoch"] == 2


def test_train_names_its_data_and_says_when_nothing_is_saved(ddl, work):
    with untouched(work):
        code, output = ddl("train", *QUICK[:-1], "--data", "folder.h5", "--subset", "128")
    lines = output.splitlines()
    assert code == 0
    assert lines[0] == ("data folder.h5: 256 train + 128 test images of 3x32x32, 4 classes (cat, "
                        "dog, frog, ship); training on a stratified subset of 128")
    assert lines[1] == "no --checkpoint: nothing of this run will be saved"


# --- subsets --------------------------------------------------------------------------------------
def test_a_stratified_subset_keeps_every_class_in_its_share():
    labels = np.repeat(np.arange(4), [600, 300, 60, 40])      # sorted by class, as a folder is
    rows = subset_rows(labels, 100, seed=3)
    assert np.array_equal(np.bincount(labels[rows]), [60, 30, 6, 4])
    assert np.all(np.diff(rows) > 0)
    assert np.array_equal(rows, subset_rows(labels, 100, seed=3))     # seeded
    assert not np.array_equal(rows, subset_rows(labels, 100, seed=4))
    odd = subset_rows(labels, 7, seed=0)           # the rounding's remainders go somewhere
    assert len(odd) == 7 and len(np.unique(odd)) == 7


def test_random_and_first_subsets():
    labels = np.repeat(np.arange(4), 250)
    rows = subset_rows(labels, 200, seed=0, draw="random")
    assert len(np.unique(rows)) == 200 and len(np.unique(labels[rows])) == 4
    assert np.array_equal(subset_rows(labels, 200, 0, "first"), np.arange(200))
    assert np.array_equal(subset_rows(labels, 5000, 0), np.arange(1000))    # more than there is


def test_a_subset_gives_the_same_global_batches_at_any_world_size():
    rows = subset_rows(np.repeat(np.arange(4), 100), 128, seed=1)
    one = DistributedSampler(128, 1, 0, 32, seed=1, rows=rows)
    four = [DistributedSampler(128, 4, r, 32, seed=1, rows=rows) for r in range(4)]
    for s in [one, *four]:
        s.set_epoch(2)
    for k, batch in enumerate(one.batches()):
        assert np.array_equal(batch, np.concatenate([s.batches()[k] for s in four]))
    assert set(np.concatenate(one.batches())) == set(rows)      # only the subset's rows


def test_the_folder_subset_learns_as_the_npz_subset_does(colour_h5, colour_folder_h5):
    """The issue's case: an image folder is written class by class, so its first rows are of one
    class; the drawn subsets of the two files hold the same classes in the same shares."""
    accuracy = {}
    for name, data in (("npz", colour_h5), ("folder", colour_folder_h5)):
        history, _ = run(Config(data=str(data), model="mlp", subset=128, batch_size=32, epochs=2,
                                quiet=True))
        accuracy[name] = history[-1]["test_accuracy"]
    assert accuracy["folder"] == pytest.approx(accuracy["npz"], abs=0.05)
    assert accuracy["folder"] > 0.5, accuracy


# --- one class numbering per data set -------------------------------------------------------------
def test_class_names_from_the_npz_or_the_command_line(ddl, colour_npz, tmp_path):
    """Named as the image folder names them, the .npz's images are the folder's data set: a
    checkpoint trained on one evaluates on the other without --other-data."""
    with np.load(colour_npz) as f:
        arrays = dict(f)
    np.savez(tmp_path / "named.npz", class_names=np.array(COLOURS), **arrays)
    for args in (["--npz", tmp_path / "named.npz"],
                 ["--npz", colour_npz, "--class-names", ",".join(COLOURS)]):
        out = tmp_path / "named.h5"
        code, output = ddl("prepare", *args, "--out", out)
        assert code == 0 and f"wrote {out}" in output, output
        with h5py.File(out) as f:
            assert list(f.attrs["class_names"]) == COLOURS and f.attrs["num_classes"] == 4
        out.unlink()


def test_the_same_images_are_the_same_data_set_whatever_the_source(ddl, work,
                                                                   colour_npz):
    run(Config(data="folder.h5", model="mlp", batch_size=64, epochs=1, quiet=True,
               checkpoint="f.h5"))
    code, on_folder = ddl("evaluate", "--checkpoint", "f.h5")
    assert code == 0, on_folder
    with np.load(colour_npz) as f:
        arrays = dict(f)
    np.savez("named.npz", class_names=np.array(COLOURS), **arrays)
    assert ddl("prepare", "--npz", "named.npz", "--out", "named.h5")[0] == 0
    code, on_npz = ddl("evaluate", "--checkpoint", "f.h5", "--data", "named.h5")
    assert code == 0 and on_npz == on_folder


@pytest.mark.parametrize("args, words", [
    (["--class-names", "a,b,c"], ["--class-names: 3 class names, but the labels go up to 3"]),
    (["--class-names", "a,b,a,c"], ["must be distinct and non-empty, got a, b, a, c"]),
    (["--class-names", "a,,b,c"], ["must be distinct and non-empty"]),
])
def test_bad_class_names_are_refused(ddl, colour_npz, tmp_path, args, words):
    with untouched(tmp_path), untouched(colour_npz.parent):
        refused(ddl("prepare", "--npz", colour_npz, "--out", tmp_path / "x.h5", *args), 2, *words)


def test_class_names_are_refused_for_an_image_folder_and_checked_in_an_npz(
        ddl, colour_folder, colour_npz, tmp_path):
    with untouched(tmp_path):
        refused(ddl("prepare", "--image-folder", colour_folder, "--out", tmp_path / "x.h5",
                    "--class-names", "a,b,c,d"), 2, "named by its class folders")
    with np.load(colour_npz) as f:
        arrays = dict(f)
    for names, words in ((np.array(["a", "b"]), "2 class names, but the labels go up to 3"),
                         (np.arange(4), "class_names is int64 (4,), expected strings")):
        np.savez(tmp_path / "bad.npz", class_names=names, **arrays)
        with untouched(tmp_path):
            refused(ddl("prepare", "--npz", tmp_path / "bad.npz", "--out", tmp_path / "x.h5"), 2,
                    words)


# --- predict any image; per-class accuracy and the confusion matrix -------------------------------
def test_predict_image_files(ddl, work, colour_folder):
    """A PNG of the training size, one twice as big (resized) and a gray JPEG (made RGB): one line
    each, the class named as the checkpoint's data names it."""
    from PIL import Image
    square = colour_folder / "test" / "dog"
    first = sorted(square.iterdir())[0]
    Image.open(first).resize((64, 64)).save("big.png")
    Image.open(first).convert("L").save("gray.jpg")
    with untouched(work):
        code, output = ddl("predict", "--checkpoint", "c.h5", "--image", first, "big.png",
                           "gray.jpg")
    lines = output.splitlines()
    assert code == 0 and len(lines) == 3, output
    assert lines[0].startswith(f"{first}: predicted 1 (p=") and "0:" in lines[0]   # dog: label 1
    assert lines[1].startswith("big.png: predicted 1 (p=")
    assert lines[2].startswith("gray.jpg: predicted ")
    code, output = ddl("predict", "--checkpoint", "c.h5", "--image", "big.png", "--out", "p.png")
    assert code == 0 and output.splitlines()[-1] == "wrote p.png"
    assert Image.open("p.png").size[0] > 100


def test_predict_refuses_what_is_not_an_image(ddl, work):
    with untouched(work):
        refused(ddl("predict", "--checkpoint", "c.h5", "--image", "colours.h5"), 2,
                "colours.h5: not an image")
        refused(ddl("predict", "--checkpoint", "c.h5", "colours.h5"), 2,
                "colours.h5: image files follow --image")
        refused(ddl("predict", "--checkpoint", "c.h5", "--image", "gone.png"), 2, "gone.png")


def test_evaluate_per_class_and_confusion(ddl, work):
    from PIL import Image
    with untouched(work):
        code, output = ddl("evaluate", "--checkpoint", "c.h5")
    lines = output.splitlines()
    assert code == 0 and len(lines) == 5, output
    with h5py.File("colours.h5") as f:
        counts = np.bincount(f["test/labels"][...], minlength=4)
    for k, line in enumerate(lines[1:]):
        assert line.startswith(f"  {k}: ") and line.endswith(f"% of {counts[k]}"), line
    code, again = ddl("evaluate", "--checkpoint", "c.h5", "--confusion", "m.png")
    assert code == 0 and again == output + "wrote m.png\n"
    assert Image.open("m.png").size[0] > 100
    with untouched(work):
        refused(ddl("evaluate", "--checkpoint", "c.h5", "--confusion", "c.h5"), 2,
                "--confusion c.h5 is the same file as --checkpoint c.h5")
        refused(ddl("evaluate", "--checkpoint", "c.h5", "--confusion", "m.xyz"), 2,
                "matplotlib writes")


def test_the_confusion_counts_sum_over_ranks(colour_h5):
    """evaluate's confusion counts add up to the accuracy it returns."""
    from ddl.comm import SingleCommunicator
    from ddl.data import H5Dataset
    from ddl.evaluation import eval_loader, evaluate
    from ddl.models import build
    model, comm = build("mlp", (3, 32, 32), 4, seed=0), SingleCommunicator()
    with H5Dataset(colour_h5, "test") as test:
        counts = np.zeros((4, 4))
        _, accuracy = evaluate(model, eval_loader(test, comm), comm, confusion=counts)
        assert counts.sum() == test.n
        assert np.array_equal(counts.sum(axis=1), np.bincount(test.labels, minlength=4))
    assert np.trace(counts) / counts.sum() == pytest.approx(accuracy)


# --- photo folders: mixed sizes, one tree ---------------------------------------------------------
@pytest.fixture
def photos(tmp_path):
    """photos/<class>/: 10 images of mixed sizes per class (a red or a blue picture)."""
    from PIL import Image
    for name, colour in (("blue", (0, 0, 255)), ("red", (255, 0, 0))):
        (tmp_path / "photos" / name).mkdir(parents=True)
        for i in range(10):
            Image.new("RGB", (20 + 3 * i, 16 + i), colour).save(
                tmp_path / "photos" / name / f"{i}.png")
    return tmp_path / "photos"


def test_resize_and_test_split_of_one_tree(ddl, photos, tmp_path):
    with untouched(photos):
        refused(ddl("prepare", "--image-folder", photos, "--test-split", "0.3", "--out",
                    tmp_path / "x.h5"), 2, "pixels, but", "--resize HxW makes them one")
        code, output = ddl("prepare", "--image-folder", photos, "--test-split", "0.3",
                           "--resize", "8x12", "--out", tmp_path / "p.h5")
    assert code == 0, output
    assert "2 classes, 3x8x12 images (resized bilinearly to 8x12), 6 of 20 held out" in output
    with h5py.File(tmp_path / "p.h5") as f:
        assert f["train/images"].shape == (14, 3, 8, 12) and f["test/images"].shape == (6, 3, 8, 12)
        assert np.array_equal(np.bincount(f["test/labels"][...]), [3, 3])      # stratified
        assert list(f.attrs["class_names"]) == ["blue", "red"]
        red = f["train/images"][f["train/labels"][...] == 1]
        assert (red[:, 0] == 255).all() and (red[:, 2] == 0).all()
        test = f["test/images"][...]
    code, _ = ddl("prepare", "--image-folder", photos, "--test-split", "0.3", "--resize", "8x12",
                  "--out", tmp_path / "again.h5", "--seed", "1")
    with h5py.File(tmp_path / "again.h5") as f:
        assert code == 0 and f["test/images"].shape == test.shape       # another draw, same size


@pytest.mark.parametrize("args, words", [
    (["--resize", "8"], ["--resize 8: expected HEIGHTxWIDTH"]),
    (["--resize", "0x8"], ["--resize 0x8"]),
    (["--test-split", "1"], ["--test-split"]),
])
def test_bad_resize_or_split_is_refused(ddl, photos, tmp_path, args, words):
    with untouched(tmp_path):
        refused(ddl("prepare", "--image-folder", photos, "--out", tmp_path / "x.h5", *args), 2,
                *words)


def test_shuffle_writes_the_same_rows_in_a_seeded_order(ddl, colour_folder,
                                                         tmp_path):
    read = {}
    for name, args in (("plain", []), ("shuffled", ["--shuffle"]), ("again", ["--shuffle"])):
        assert ddl("prepare", "--image-folder", colour_folder, "--out", tmp_path / f"{name}.h5",
                   *args)[0] == 0
        with h5py.File(tmp_path / f"{name}.h5") as f:
            read[name] = (f["train/images"][...], f["train/labels"][...].astype(int),
                          dict(f.attrs))
    (images, labels, attrs), (mixed, mixed_labels, mixed_attrs) = read["plain"], read["shuffled"]
    assert np.all(np.diff(labels) >= 0) and not np.all(np.diff(mixed_labels) >= 0)
    assert sorted(zip(map(bytes, mixed), mixed_labels)) == sorted(zip(map(bytes, images), labels))
    assert np.array_equal(read["again"][0], mixed)                        # seeded
    assert np.array_equal(mixed_attrs["mean"], attrs["mean"])
    assert len(np.unique(mixed_labels[:32])) == 4                         # a prefix has them all


def test_split_refuses_a_tree_with_train_and_test(ddl, colour_folder, colour_npz,
                                                   tmp_path):
    with untouched(tmp_path):
        refused(ddl("prepare", "--image-folder", colour_folder, "--test-split", "0.2", "--out",
                    tmp_path / "x.h5"), 2, "holds train/ and test/ already")
        refused(ddl("prepare", "--npz", colour_npz, "--resize", "8x8", "--out",
                    tmp_path / "x.h5"), 2, "for --image-folder only")


# --- training output ------------------------------------------------------------------------------
def test_the_progress_bar_shows_an_eta():
    import io
    from ddl.log import Log, clock
    stream = io.StringIO()
    log = Log(True, stream=stream)
    log.every = 0                           # not throttled
    log.progress(1, 2, 10, 40, 0.5, 1000.0, 95.4)
    assert stream.getvalue().rstrip().endswith("1,000 img/s ETA 1:35")
    assert (clock(7), clock(754), clock(3723)) == ("0:07", "12:34", "1:02:03")


def test_keep_best_keeps_the_best_epoch_beside_the_last(ddl, work, monkeypatch):
    """Test accuracies 0.5, 0.75, 0.25: c-best.h5 holds epoch 2, c2.h5 epoch 3."""
    scores = iter([(1.0, 0.5), (0.5, 0.75), (2.0, 0.25)])
    monkeypatch.setattr("ddl.train.evaluate", lambda *args: next(scores))
    code, output = ddl("train", *QUICK, "--data", "colours.h5", "--epochs", "3",
                       "--checkpoint", "c2.h5", "--keep-best")
    assert code == 0, output
    assert checkpoint.load("c2-best.h5")["epoch"] == 2 and checkpoint.load("c2.h5")["epoch"] == 3
    (work / "c4-best.h5").write_text("")
    with untouched(work):
        refused(ddl("train", *QUICK, "--data", "colours.h5", "--checkpoint", "c3-best.h5",
                    "--keep-best", "--metrics", "c3-best-best.h5"), 2,
                "--keep-best c3-best-best.h5 is the same file as --metrics c3-best-best.h5")
        refused(ddl("train", *QUICK, "--data", "colours.h5", "--keep-best"), 2,
                "--keep-best needs --checkpoint PATH")
        refused(ddl("train", *QUICK, "--data", "colours.h5", "--checkpoint", "c4.h5",
                    "--keep-best"), 2, "--keep-best c4-best.h5 already exists")


# --- models: a summary, and a shape error that names its layer ------------------------------------
def test_a_model_summary_lists_each_layer():
    from ddl import nn
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1, rng=0), nn.ReLU(), nn.MaxPool2d(2),
                          nn.Flatten(), nn.Linear(8 * 16 * 16, 4, rng=0))
    before = {k: v.copy() for k, v in model.state_dict().items()}
    lines = model.summary((3, 32, 32)).splitlines()
    assert lines[0].split() == ["layer", "output", "shape", "parameters"]
    assert lines[2].split()[-2:] == ["8x32x32", "224"] and lines[2].startswith("0: Conv2d(3, 8,")
    assert [line.split()[-2] for line in lines[3:7]] == ["8x32x32", "8x16x16", "2048", "4"]
    assert lines[6].split()[-1] == "8,196" and lines[6].startswith("4: Linear(2048, 4,")
    assert lines[-1] == "input 3x32x32, output 4: 8,420 parameters (0.03 MiB as float32)"
    assert model.training and all(np.array_equal(v, before[k])
                                  for k, v in model.state_dict().items())
    assert type(model).forward is nn.Sequential.forward and "forward" not in vars(model[0])


def test_a_nested_model_summary_indents_its_children():
    from ddl.models import build
    lines = build("resnet-mini", (3, 32, 32), 4).summary((3, 32, 32)).splitlines()
    assert any(line.startswith("  body: Sequential()") for line in lines)
    assert any(line.startswith("    0: Conv2d(16, 16,") for line in lines)
    total = sum(p.data.size for p in build("resnet-mini", (3, 32, 32), 4).parameters())
    assert f": {total:,} parameters" in lines[-1]


def test_a_model_summary_table_exactly():
    """Columns as wide as their widest cell (the counts right-aligned), each module's own
    parameters (a user's module holding a child and a parameter of its own), the model's output
    shape being its own (here not its last layer's), and the module restored after tracing."""
    from ddl import nn

    class Head(nn.Module):
        def __init__(self):
            super().__init__()
            self.scale = nn.Parameter(np.ones(1))
            self.fc = nn.Linear(16, 6, rng=0)

        def forward(self, x):
            return (self.fc(x) * self.scale.data).reshape(len(x), 2, 3)
    model = nn.Sequential(nn.Conv2d(1, 1, 3, padding=1, rng=0), nn.Flatten(), Head())
    conv = "0: Conv2d(1, 1, kernel_size=(3, 3), stride=(1, 1), padding=(1, 1), bias=True)"
    rule = "-" * (len(conv) + 26)
    assert model.summary((1, 4, 4)).splitlines() == [
        "layer" + " " * (len(conv) - 3) + "output shape  parameters", rule,
        conv + "  1x4x4                 10",
        "1: Flatten()".ljust(len(conv)) + "  16                     0",
        "2: Head()".ljust(len(conv)) + "  2x3                    1",
        "  fc: Linear(16, 6, bias=True)".ljust(len(conv)) + "  6                    102", rule,
        "input 1x4x4, output 2x3: 113 parameters (0.00 MiB as float32)"]
    assert not any({"forward", "run"} & set(vars(m)) for m in model.modules())


def test_a_model_summary_of_one_layer_lists_that_layer():
    from ddl import nn
    alone = nn.Linear(4, 2, rng=0).summary((4,)).splitlines()
    assert alone[2] == ": Linear(4, 2, bias=True)  2                     10"
    assert nn.Sequential(nn.Linear(4, 2, rng=0)).summary((4,)).splitlines()[2:4] == [
        "0: Linear(4, 2, bias=True)  2                     10", "-" * 52]


def test_a_summary_trace_names_the_layer_a_forward_failed_in():
    """The input shape of the failing layer as it got it (a Conv2d gets it in `run`, after the
    backend)."""
    from ddl import nn
    from ddl.nn.summary import trace, where
    model = nn.Sequential(nn.ReLU(), nn.Conv2d(3, 4, 3, rng=0))
    with pytest.raises(ValueError) as failed:
        trace(model, (1, 8, 8))
    assert where(failed.value) == ("layer 1 Conv2d(3, 4, kernel_size=(3, 3), stride=(1, 1), "
                                   "padding=(0, 0), bias=True) got input of shape (2, 1, 8, 8)")
    assert model.training and where(ValueError("elsewhere")) == ""


def test_ddl_summary(ddl, work, tmp_path):
    (tmp_path / "mine.py").write_text(
        "from ddl import nn\n\n\ndef make(in_shape, num_classes):\n"
        "    return nn.Sequential(nn.Flatten(), nn.Linear(100, num_classes))\n")
    with untouched(work):
        code, output = ddl("summary", "--model", "mlp", "--data", "colours.h5")
        assert code == 0 and output.startswith("mlp for colours.h5: 4 classes\nlayer"), output
        refused(ddl("summary", "--model", f"{tmp_path / 'mine.py'}:make", "--data", "colours.h5"),
                2, "cannot take 3x32x32 images (layer 1 Linear(100, 4, bias=True) got input of "
                "shape (2, 3072): ValueError: Linear takes (N, 100) inputs")
        refused(ddl("summary", "--data", "gone.h5"), 2, "gone.h5: no such file")


def test_the_example_model_file_trains(ddl, work):
    example = Path(__file__).parents[1] / "examples" / "your_model.py"
    code, output = ddl("summary", "--model", f"{example}:make_model", "--data", "colours.h5")
    assert code == 0 and "Dropout" in output and "BatchNorm2d" in output, output
    code, output = ddl("train", "--model", f"{example}:make_model", "--data", "colours.h5",
                       "--batch-size", "64", "--epochs", "1", "--quiet")
    assert code == 0, output
