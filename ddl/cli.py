"""The `ddl` command: train, launch, prepare, evaluate, predict, summary.

Errors a user can fix (ddl.errors) print one line, once, and exit with their documented status on
every rank. Any other exception in a multi-rank job prints its traceback from the rank that raised
it and aborts the whole job, so no rank is left waiting in a collective.
"""
import sys
import traceback

import click
import numpy as np

from ddl import config
from ddl.comm import SingleCommunicator, launched_rank, launched_size, world
from ddl.errors import DDLError, UsageError

DATA = click.option("--data", default=None, help="HDF5 file written by `ddl prepare` [default: "
                                                  "the one the checkpoint was trained on].")
OTHER_DATA = click.option("--other-data", is_flag=True,
                          help="Take --data although it is not the data set the checkpoint was "
                               "trained on (its classes must still be the same).")


def _model_options(command):
    """--model and --trust-model, for the commands that rebuild a checkpoint's model: a
    checkpoint is data, and runs no model file that the user did not name or confirm."""
    command = click.option("--trust-model", is_flag=True,
                           help="Run the model file that the checkpoint names (without it, "
                                "ddl runs only a file you name with --model).")(command)
    return click.option("--model", default=None, metavar="FILE.py:FUNCTION",
                        help="Rebuild the checkpoint's model with this file's function.")(command)


def _job(comm, fn):
    """Run `fn()` on every rank of `comm`, turning failures into exit codes (see module doc)."""
    try:
        return fn()
    except DDLError as e:
        if e.everywhere or comm.size == 1:  # every rank stops together: a clean exit
            if comm.rank == 0:
                click.echo(f"{e.prefix}{e}", err=True)
            sys.exit(e.status)
        who = "" if e.names_ranks else f"rank {comm.rank}: "
        click.echo(f"{e.prefix}{who}{e}", err=True)
        comm.abort(e.status)
    except KeyboardInterrupt:
        if comm.size > 1:
            comm.abort(130)
        sys.exit(130)
    except Exception as e:
        where = f"rank {comm.rank}: " if comm.size > 1 else ""
        # A failure of the disk (reading data mid-run) explains itself in one line; anything else
        # is a bug and keeps its traceback.
        if not isinstance(e, OSError):
            traceback.print_exc()
        click.echo(f"Error: {where}{type(e).__name__}: {e}", err=True)
        if comm.size > 1:
            comm.abort(1)
        sys.exit(1)


def _threads(n):
    """One BLAS thread per rank in a multi-rank job unless told otherwise."""
    from threadpoolctl import threadpool_limits
    if n or launched_size() > 1:
        threadpool_limits(n or 1)


@click.group(context_settings=dict(help_option_names=["-h", "--help"]))
@click.version_option(package_name="ddl")
def cli():
    """ddl: data-parallel training of NumPy CNNs over MPI.

    \b
    mpirun -n 4 ddl train       data-parallel training on 4 ranks
    ddl launch -n 4 -- train    the same, finding the project's mpiexec for you
    ddl train                   one process, no MPI (debug mode)
    """


@cli.command()
@config.click_options
@click.option("--threads", type=click.IntRange(min=0), default=0,
              help="BLAS threads per rank (0: auto).")
def train(threads, **options):
    """Train a model; under mpirun, one replica per rank."""
    from ddl.train import run
    _threads(threads)
    ctx = click.get_current_context()
    given = {name for name in options
             if ctx.get_parameter_source(name) is click.core.ParameterSource.COMMANDLINE}
    cfg = config.Config(**config.with_recipe(options, given))
    comm = world()
    _job(comm, lambda: run(cfg, comm))


@cli.command(context_settings=dict(ignore_unknown_options=True, allow_interspersed_args=False))
@click.option("-n", "--np", "nprocs", type=click.IntRange(min=1), required=True,
              help="Number of ranks.")
@click.option("--hostfile", type=click.Path(exists=True, dir_okay=False, readable=True),
              help="Hosts to spread the ranks over (mpiexec's hostfile format).")
@click.option("--mpiexec", default=None, help="The mpiexec to use (default: the project's).")
@click.option("--agent", default=None, metavar="PROGRAM",
              help="The remote shell that starts processes on the other hosts, called as "
                   "`PROGRAM HOST COMMAND` [default: mpiexec's, ssh].")
@click.option("--iface", default=None, metavar="IFACE",
              help="The network interface the ranks talk over (e.g. eth0, ib0).")
@click.option("--max-restarts", type=click.IntRange(min=0), default=0,
              help="Run `train ... --checkpoint PATH` again from its checkpoint when it fails, "
                   "up to N times.")
@click.option("--min-ranks", type=click.IntRange(min=1), default=None, metavar="M",
              help="Elastic: a restart leaves out the hosts that are gone (lost by the "
                   "watchdog, or out of the agent's reach) and goes on on the others with the "
                   "same global batch, while at least M ranks remain (docs/elastic.md).")
@click.option("--hosts-file-reread", "reread", is_flag=True,
              help="With --min-ranks: read --hostfile again before each restart (a host that "
                   "is back is used again).")
@click.option("--host-discovery-script", "discovery", default=None, metavar="CMD",
              help="With --min-ranks: the hosts are what the shell command CMD prints "
                   "(`host:N` lines), run again before each restart.")
@click.argument("args", nargs=-1, type=click.UNPROCESSED, required=True)
def launch(nprocs, hostfile, mpiexec, agent, iface, max_restarts, min_ranks, reread, discovery,
           args):
    """Run `ddl ARGS...` on N ranks through mpiexec, e.g. `ddl launch -n 4 -- train`."""
    from ddl.launch import launch as run_launch
    sys.exit(run_launch(nprocs, args, mpiexec, hostfile, max_restarts, agent, iface, min_ranks,
                        reread, discovery))


@cli.command()
@click.option("--raw", type=click.Path(file_okay=False),
              help="Folder of IDX gzip files in MNIST's names [default: ../shared/data/mnist].")
@click.option("--npz", type=click.Path(dir_okay=False),
              help="An .npz of x_train, y_train, x_test, y_test (Keras's layout; images "
                   "channels-last or channels-first).")
@click.option("--image-folder", type=click.Path(file_okay=False),
              help="Images in DIR/train/<class>/ and DIR/test/<class>/ (PNG, JPEG, ...).")
@click.option("--out", help="HDF5 file to write [default: data/DATASET.h5].")
@click.option("--dataset", help="Its name: mnist or fashion-mnist for --raw (checksums, mirrors, "
                                "class names; any name with --no-verify) [default: mnist, or the "
                                "file or folder name].")
@click.option("--no-verify", is_flag=True, help="--raw: accept files whose MD5 is not the "
                                                "canonical one.")
@click.option("--download", is_flag=True, help="--raw: fetch missing files from the public "
                                               "mirrors.")
@click.option("--class-names", metavar="A,B,C",
              help="--raw or --npz: the classes' names, label k -> the k-th [default: an .npz's "
                   "class_names array, the data set's names, else 0..K-1; an image folder's are "
                   "its class folders' names, sorted].")
@click.option("--resize", metavar="HxW",
              help="--image-folder: resize every image to H x W pixels (Pillow's bilinear filter, "
                   "antialiased when it shrinks; the aspect ratio is not kept).")
@click.option("--test-split", type=click.FloatRange(0, 1, min_open=True, max_open=True),
              metavar="FRACTION",
              help="--image-folder DIR of DIR/<class>/ folders: hold out this fraction of each "
                   "class's images for testing (at random, seeded by --seed).")
@click.option("--shuffle", is_flag=True,
              help="--image-folder: write the rows in a random order (seeded by --seed), so that "
                   "the file's first rows are a fair sample [default: class by class, as the "
                   "folders are; `ddl train --subset` draws its sample either way].")
@click.option("--seed", type=click.IntRange(min=0), default=0, show_default=True,
              help="The seed of --test-split and --shuffle.")
def prepare(raw, npz, image_folder, out, dataset, no_verify, download, class_names, resize,
            test_split, shuffle, seed):
    """Convert an image classification set into the HDF5 file that training reads."""
    from ddl import sources
    from ddl.prepare import check_out, prepare as write

    def job():
        given = [(flag, value) for flag, value in (("--raw", raw), ("--npz", npz),
                                                     ("--image-folder", image_folder)) if value]
        if len(given) > 1:
            raise UsageError(f"{' and '.join(flag for flag, _ in given)}: give one source")
        if (no_verify or download) and (npz or image_folder):
            raise UsageError("--no-verify and --download are for --raw (IDX files) only")
        if (resize or test_split or shuffle) and not image_folder:
            raise UsageError("--resize, --test-split and --shuffle are for --image-folder only")
        if class_names is not None and image_folder:
            raise UsageError("--class-names: an image folder's classes are named by its class "
                             "folders")
        raw_dir = raw or "../shared/data/mnist"
        if out:                                 # before the source is read
            check_out(out, [(flag, value) for flag, value in given if flag != "--raw"]
                      + ([] if npz or image_folder else sources.idx_inputs(raw_dir)))
        if npz:
            source = sources.npz(npz, log=click.echo)
        elif image_folder:
            from ddl.images import size
            source = sources.image_folder(image_folder, log=click.echo,
                                          resize=resize and size(resize), test_split=test_split,
                                          seed=seed, shuffle=shuffle)
        else:
            source = sources.idx(raw_dir, dataset or "mnist",
                                 verify=not no_verify, download=download, log=click.echo)
        if class_names is not None:
            sources.named(source, class_names.split(","), "--class-names")
        if dataset:
            source.attrs["dataset"] = dataset
        path = out or f"data/{source.attrs['dataset']}.h5"
        check_out(path, source.inputs)
        write(source, path, log=click.echo)
    _job(SingleCommunicator(), job)


@cli.command()
@click.option("--checkpoint", required=True, help="Checkpoint written by `ddl train`.")
@DATA
@_model_options
@OTHER_DATA
@click.option("--confusion", default="", metavar="PATH",
              help="Write the confusion matrix here (PNG, PDF, ...): rows the labels, columns the "
                   "predicted classes.")
def evaluate(checkpoint, data, model, trust_model, other_data, confusion):
    """Test loss and accuracy of a checkpoint, and each class's accuracy (also under mpirun)."""
    from ddl.comm import agree
    from ddl.evaluation import checked_split, eval_loader, evaluate as run_eval, restore
    _threads(0)
    comm = world()

    def check_confusion():
        from ddl.atomic import check_outputs
        from ddl.models import model_inputs
        from ddl.plots import check_format
        check_outputs([("--confusion", confusion)], [("--data", data or ""),
                                                     ("--checkpoint", checkpoint)]
                      + model_inputs(model))
        check_format(confusion, "--confusion")

    def job():
        if confusion:
            agree(comm, lambda: comm.rank == 0 and check_confusion(), "output check")
        net, state, takes = restore(checkpoint, comm, model, trust_model)
        test = agree(comm, lambda: checked_split(data, state, takes, checkpoint, other_data))
        counts = np.zeros((test.num_classes,) * 2)
        loss, accuracy = run_eval(net, eval_loader(test, comm), comm, confusion=counts)
        if comm.rank == 0:
            click.echo(f"test loss {loss:.4f}, accuracy {100 * accuracy:.2f}% "
                       f"({test.n:,} images, {comm.size} rank(s))")
            for name, row, right in zip(test.class_names, counts, np.diag(counts)):
                click.echo(f"  {name}: " + (f"{100 * right / row.sum():.2f}% of {row.sum():,.0f}"
                                            if row.sum() else "no test images"))
        if confusion:
            from ddl.plots import confusion_matrix
            agree(comm, lambda: comm.rank == 0 and confusion_matrix(counts, test.class_names,
                                                                    confusion), "plot write")
            if comm.rank == 0:
                click.echo(f"wrote {confusion}")
    _job(comm, job)


@cli.command()
@click.option("--checkpoint", required=True, help="Checkpoint written by `ddl train`.")
@DATA
@OTHER_DATA
@click.option("--index", type=int, default=0, show_default=True, help="Test image to classify.")
@click.option("--image", "image", type=click.Path(dir_okay=False),
              help="Classify image files instead (PNG, JPEG, ...: --image A.png B.jpg ...), "
                   "converted to the checkpoint's images: gray or RGB, resized bilinearly if "
                   "their size differs, normalised with the training set's mean and std.")
@click.option("--out", default="", help="Write the image and its class probabilities here (PNG; "
                                        "with several --image files, the last one's).")
@_model_options
@click.argument("more", nargs=-1, type=click.Path(dir_okay=False))
def predict(checkpoint, data, other_data, index, image, out, more, model, trust_model):
    """Classify one test image, or image files, and show the class probabilities."""
    from ddl import predict as predicting
    from ddl.atomic import check_outputs
    from ddl.evaluation import restore
    from ddl.models import model_inputs

    def job():
        if more and not image:
            raise UsageError(f"{more[0]}: image files follow --image")
        if out:
            from ddl.plots import check_format
            check_outputs([("--out", out)], [("--data", data or ""), ("--checkpoint", checkpoint)]
                          + [("--image", path) for path in (image, *more) if path]
                          + model_inputs(model))
            check_format(out, "--out")
        net, state, takes = restore(checkpoint, SingleCommunicator(), model, trust_model)
        if image:
            drawn = predicting.files(net, state, takes, [image, *more], click.echo)
        else:
            drawn = predicting.test_image(net, state, takes, checkpoint, data, other_data,
                                          index, click.echo)
        if out:
            predicting.picture(drawn, out)
            click.echo(f"wrote {out}")
    _job(SingleCommunicator(), job)


@cli.command()
@click.option("--model", default="seed-cnn", show_default=True,
              help="A named model, or your own: FILE.py:FUNCTION (as `ddl train --model`).")
@click.option("--data", default="data/mnist.h5", show_default=True,
              help="The HDF5 file whose images and classes the model is built for.")
def summary(model, data):
    """Each layer of a model with its output shape and parameters, for the images of --data."""
    from ddl.data import H5Dataset
    from ddl.models import build

    def job():
        with H5Dataset(data, "train") as train:
            shape, classes = train.image_shape, train.num_classes
        table = build(model, shape, classes).summary(shape)
        click.echo(f"{model} for {data}: {classes} classes\n{table}")
    _job(SingleCommunicator(), job)


def main(argv=None):
    """Entry point: click's errors print one line, once (rank 0), however many ranks parsed the
    options."""
    try:
        code = cli.main(args=argv, standalone_mode=False)
    except click.exceptions.Abort:
        code = 130
    except click.ClickException as e:
        if launched_rank() == 0:
            click.echo(f"Error: {e.format_message()}", err=True)
        code = e.exit_code
    except DDLError as e:   # raised before any collective, so by every rank alike: say it once
        if launched_rank() == 0:
            click.echo(f"{e.prefix}{e}", err=True)
        code = e.status
    sys.exit(code or 0)

