"""Where the sweep's data come from: the named datasets, an npz URL, or a local npz file.

A named dataset or a URL is produced on the cluster by one download Execute task (the standalone
programs/fetch_data.py), so the data never pass through the user's machine; a local file is checked
here and put into Ray as a data object.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING

from pipeline.programs.fetch_data import MNIST_SHA256, MNIST_URL, check_npz

if TYPE_CHECKING:  # imported lazily: pipeline.tasks imports Ray
    from pipeline import tasks

NAMED = ("mnist", "mnist-5k")

__all__ = ["MNIST_SHA256", "MNIST_URL", "DataPlan", "Dataset", "plan", "produce", "program_bytes"]


def program_bytes(name: str) -> bytes:
    return resources.files("pipeline.programs").joinpath(name).read_bytes()


@dataclass(frozen=True)
class DataPlan:
    source: str  # mnist, mnist-5k, a URL, or a local path
    local: bool  # a local file, already checked


@dataclass(frozen=True)
class Dataset:
    data: tasks.DataObject
    name: str  # what was used (mnist-5k when the default download fell back)
    note: str | None  # a line for the user, e.g. why it fell back
    train: int
    test: int


def plan(spec: str) -> DataPlan:
    """Check a --data value before any work starts; raise ValueError with what is valid."""
    if spec in NAMED or spec.startswith(("http://", "https://")):
        return DataPlan(spec, local=False)
    path = Path(spec).expanduser()
    if not path.exists():
        raise ValueError(f"--data {spec!r}: no such file; use mnist, mnist-5k, an http(s) URL or a path to an npz")
    check_npz(str(path))
    return DataPlan(str(path), local=True)


def produce(p: DataPlan, timeout: float | None = None) -> Dataset:
    """Make the dataset a data object in Ray (through one download task unless it is a local file)."""
    from pipeline import tasks

    if p.local:
        n_train, n_test = check_npz(p.source)
        return Dataset(tasks.file(p.source), os.path.basename(p.source), None, n_train, n_test)
    args = [
        "python3",
        tasks.blob(program_bytes("fetch_data.py"), "fetch_data.py"),
        "--source",
        p.source,
        "--out",
        "mnist.npz",
    ]
    if p.source == "mnist":
        args += ["--sha256", MNIST_SHA256, "--fallback", "mnist-5k"]
    t = tasks.Execute(args, output_paths=["mnist.npz"], stdout=True, name=f"download {p.source}", cpus=0.5)
    t.wait(timeout=timeout)
    meta = json.loads(t.outputs["stdout"].fetch().get_str().strip().splitlines()[-1])
    return Dataset(t.outputs["mnist.npz"], meta["dataset"], meta.get("note"), meta["train"], meta["test"])
