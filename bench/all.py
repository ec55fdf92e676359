"""Run every benchmark in turn: python -m bench.all (make bench)."""

from bench import parallel_create, shared_input, sweep_efficiency, task_overhead


def main():
    task_overhead.main([])
    shared_input.main([])
    parallel_create.main([])
    sweep_efficiency.main([])
    from cloud.sim.hosts import missing_requirements
    from tests.conftest import WHEELHOUSE

    if missing_requirements() or not (WHEELHOUSE / ".complete").exists():
        print(
            "cluster: skipped (needs root with iproute2, nftables, sshd, and a finished `make test`, "
            "which fills the nodes' wheelhouse)"
        )
    else:
        from bench import cluster

        cluster.main([])


if __name__ == "__main__":
    main()
