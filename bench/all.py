"""Run every benchmark in turn: python -m bench.all (make bench)."""

from bench import (
    adaptive,
    parallel_create,
    progress_latency,
    ray_arg_cost,
    shared_input,
    sim_scale,
    status_cost,
    stdout_rss,
    sweep_efficiency,
    task_overhead,
)


def main():
    task_overhead.main([])
    ray_arg_cost.main([])
    shared_input.main([])
    parallel_create.main([])
    sim_scale.main([])
    status_cost.main([])
    sweep_efficiency.main([])
    stdout_rss.main([])
    progress_latency.main([])
    adaptive.main([])
    from cloud.sim.hosts import missing_requirements

    if missing_requirements():
        print(f"cluster: skipped (needs {', '.join(missing_requirements())}: root with iproute2, nftables, sshd)")
    else:
        from bench import cluster, elastic, tunnel

        cluster.main([])
        elastic.main([])
        tunnel.main([])


if __name__ == "__main__":
    main()
