"""Pictures for people: training curves and a prediction (matplotlib, an optional extra)."""
import os

from ddl.atomic import replacing
from ddl.errors import UsageError


def _pyplot():
    try:
        import matplotlib
    except ImportError:
        raise UsageError("plots need matplotlib: pip install 'ddl[plot]'") from None
    matplotlib.use("Agg")          # files only; no display is needed or wanted
    import matplotlib.pyplot as plt
    return plt


def _format(path):
    return os.path.splitext(path)[1][1:].lower()


def check_format(path, option):
    """UsageError unless matplotlib is installed and writes `path`'s format (its extension), so
    that a run does not train for an hour to fail on its last line."""
    _pyplot()
    from matplotlib.backend_bases import FigureCanvasBase
    known = FigureCanvasBase.get_supported_filetypes()
    if _format(path) not in known:
        raise UsageError(f"{option} {path}: matplotlib writes {', '.join(sorted(known))} files, "
                         f"not {_format(path) or 'files without an extension'}")


def _save(plt, fig, path):
    """Write `fig` to `path` whole or not at all (the format from the name, as matplotlib does)."""
    try:
        with replacing(path) as tmp:
            fig.savefig(tmp, dpi=100, format=_format(path))
    finally:
        plt.close(fig)


def curves(history, path):
    """Loss (train and test) and test accuracy per epoch, from the metrics history."""
    plt = _pyplot()
    epochs = [r["epoch"] for r in history]
    fig, (left, right) = plt.subplots(1, 2, figsize=(9, 3.5))
    left.plot(epochs, [r["train_loss"] for r in history], "o-", label="train")
    left.plot(epochs, [r["test_loss"] for r in history], "o-", label="test")
    left.set(xlabel="epoch", ylabel="cross-entropy loss", yscale="log")
    left.legend()
    right.plot(epochs, [100 * r["test_accuracy"] for r in history], "o-", color="C2")
    right.set(xlabel="epoch", ylabel="test accuracy (%)")
    for ax in (left, right):
        ax.grid(alpha=0.3)
    fig.tight_layout()
    _save(plt, fig, path)


def prediction(image, probs, label, path):
    """The digit (H, W uint8) beside a bar chart of the 10 class probabilities."""
    plt = _pyplot()
    fig, (left, right) = plt.subplots(1, 2, figsize=(7, 3))
    left.imshow(image, cmap="gray")
    left.set_title(f"test digit (label {label})")
    left.axis("off")
    colors = ["C2" if d == probs.argmax() else "C0" for d in range(len(probs))]
    right.bar(range(len(probs)), probs, color=colors)
    right.set(xticks=range(len(probs)), ylim=(0, 1), xlabel="class", ylabel="probability",
              title=f"predicted {probs.argmax()}")
    fig.tight_layout()
    _save(plt, fig, path)
