"""Pictures for people: training curves and a prediction (matplotlib, an optional extra)."""
import os

import numpy as np

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
        with replacing(path) as f:
            fig.savefig(f, dpi=100, format=_format(path))
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


def prediction(image, probs, shown, names, title, path):
    """The image (C, H, W uint8), titled `title`, beside a bar chart of the probabilities of the
    classes `shown` (indices, in the order of the bars), named by the class `names`."""
    plt = _pyplot()
    fig, (left, right) = plt.subplots(1, 2, figsize=(7, 3))
    pixels = image[0] if len(image) not in (3, 4) else image.transpose(1, 2, 0)
    left.imshow(pixels, cmap="gray" if pixels.ndim == 2 else None)
    left.set_title(title)
    left.axis("off")
    best = probs.argmax()
    right.bar(range(len(shown)), probs[shown], color=["C2" if k == best else "C0" for k in shown])
    right.set(ylim=(0, 1), xlabel="class", ylabel="probability", title=f"predicted {names[best]}")
    tilt = max(len(names[k]) for k in shown) > 2          # words, not digits: slanted
    right.set_xticks(range(len(shown)), [names[k] for k in shown], rotation=45 if tilt else 0,
                     ha="right" if tilt else "center")
    fig.tight_layout()
    _save(plt, fig, path)


def confusion_matrix(counts, names, path):
    """The confusion matrix `counts` (K, K) (row: the label, column: the predicted class) as a
    heat map of each row's shares, with the counts written in its cells up to 20 classes."""
    plt = _pyplot()
    k = len(names)
    shares = counts / counts.sum(axis=1, keepdims=True).clip(min=1)
    side = min(12, 3 + 0.5 * k)
    fig, ax = plt.subplots(figsize=(side, side))
    ax.imshow(shares, cmap="Blues", vmin=0, vmax=1)
    if k <= 20:
        for (i, j), n in np.ndenumerate(counts):
            ax.text(j, i, f"{n:.0f}", ha="center", va="center",
                    color="white" if shares[i, j] > 0.5 else "black", fontsize=8)
    ax.set_xticks(range(k), names, rotation=45 if max(map(len, names)) > 2 else 0, ha="right")
    ax.set_yticks(range(k), names)
    ax.set(xlabel="predicted class", ylabel="label",
           title=f"accuracy {100 * np.trace(counts) / counts.sum():.2f}%")
    fig.tight_layout()
    _save(plt, fig, path)
