#!/usr/bin/env python3
"""python exoscale.py <command>: the cluster CLI (see cloud/cli.py). Not the `exoscale` PyPI package.

The glue between the halves: the nodes' extra packages default to what the training program needs."""

import sys

from cloud.cli import main
from pipeline.requirements import NODE_PACKAGES

if __name__ == "__main__":
    sys.exit(main(default_packages=NODE_PACKAGES))
