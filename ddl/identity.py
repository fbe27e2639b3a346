"""What ties a checkpoint to its data: the data file's path, its class names, and a fingerprint of
its labels and image statistics, recorded by `ddl train` and checked by `ddl evaluate`, `ddl
predict` and `--resume`, so that a checkpoint is never silently run on another data set (another
file left at the default path, a relabelled copy, the same images numbered another way).
"""
import hashlib
import os

import numpy as np

from ddl.errors import DataError

OTHER_DATA = "--other-data"


def fingerprint(train, test):
    """A hex digest of what makes a data set itself, wherever it lives: every label of both
    splits (in row order) and the pixel statistics that `ddl prepare` computed from every training
    image, with the image shape. A relabelled copy of the same pixels differs; a moved copy does
    not."""
    digest = hashlib.sha256()
    for split in (train, test):
        digest.update(np.int64(split.n).tobytes())
        digest.update(np.ascontiguousarray(split.labels, np.int64).tobytes())
    digest.update(np.asarray(train.image_shape, np.int64).tobytes())
    digest.update(np.asarray(train.mean, np.float64).tobytes())
    digest.update(np.asarray(train.std, np.float64).tobytes())
    return digest.hexdigest()[:32]


def data_identity(path, train, test):
    """What a checkpoint records of data file `path` (its splits `train` and `test`): the
    absolute path (where `evaluate` and `--resume` look without --data), sizes, image shape,
    class names, pixel statistics and `fingerprint`."""
    return dict(path=os.path.abspath(path), train=train.n, test=test.n,
                classes=train.num_classes, class_names=list(train.class_names),
                shape=list(train.image_shape), mean=train.mean.tolist(),
                std=train.std.tolist(), fingerprint=fingerprint(train, test))


def differences(saved, now):
    """The keys of identity `saved` (a checkpoint's) whose values `now` does not share; the path
    is no part of a data set's identity, and what an older checkpoint lacks (None) is not
    compared."""
    return [key for key, value in saved.items()
            if key != "path" and value is not None and now.get(key) != value]


def same_classes(saved, now):
    """Whether identity `now` numbers the classes as `saved` does (an older checkpoint without
    names: the same number of classes)."""
    names = saved.get("class_names")
    return now["classes"] == saved["classes"] and (names is None or names == now["class_names"])


def listed(names, most=12):
    """Class names as the messages list them: "cat, dog, frog", the first `most` of many."""
    return ", ".join(names[:most]) + (", ..." if len(names) > most else "")


def class_names(identity):
    """The class names that `identity` records (one from before checkpoints recorded them:
    "0".."K-1")."""
    return identity.get("class_names") or [str(k) for k in range(identity["classes"])]


def _names(identity):
    return listed(class_names(identity))


def check(saved, now, checkpoint, other=False):
    """Refuse (DataError, one line) data of identity `now` for the checkpoint whose recorded
    identity is `saved`: another class numbering always; other labels or images unless `other`
    (--other-data: evaluate on other data on purpose)."""
    if not same_classes(saved, now):
        raise DataError(f"{now['path']}: its classes ({_names(now)}) are not those that "
                        f"{checkpoint} was trained on ({_names(saved)}): its predictions would "
                        f"be scored against other classes")
    differ = differences(saved, now)
    if differ and not other:
        raise DataError(f"{now['path']} is not the data set {checkpoint} was trained on "
                        f"({saved.get('path')}): its {' and '.join(_what(differ))} differ; "
                        f"pass {OTHER_DATA} to evaluate on other data on purpose")


def _what(keys):
    """The differing identity keys in words."""
    words = {"train": "sizes", "test": "sizes", "shape": "image shape", "mean": "pixel statistics",
             "std": "pixel statistics", "fingerprint": "labels or images"}
    found = []
    for key in keys:
        if words.get(key, key) not in found:
            found.append(words.get(key, key))
    return found
