"""What the training program (`pipeline/programs/mnist.py`) needs on a node besides Ray: the default
of cluster.toml's `packages`, which `exoscale.py` hands to the cluster CLI (`cloud` itself knows no
workload). `install` pins each to the version installed on this machine, where there is one."""

NODE_PACKAGES: tuple[str, ...] = ("numpy", "tensorflow-cpu", "mlxtend")
