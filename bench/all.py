"""Run every benchmark in turn: python -m bench.all"""

from bench import parallel_create, shared_input, sweep_efficiency, task_overhead


def main():
    task_overhead.main([])
    shared_input.main([])
    parallel_create.main([])
    sweep_efficiency.main([])


if __name__ == "__main__":
    main()
