#!/usr/bin/env python3
"""python exoscale.py <command>: the cluster CLI (see cloud/cli.py). Not the `exoscale` PyPI package."""

import sys

from cloud.cli import main

if __name__ == "__main__":
    sys.exit(main())
