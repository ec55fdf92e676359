#!/usr/bin/env python3
"""Gradient descent with momentum on the Rosenbrock valley, from a seeded random start; plain Python.

    python3 descent.py --lr 0.001 --momentum 0.9 [--steps 2000] [--seed 0]

Prints a JSON line every 500 steps and, last, {"loss": FINAL, "steps": N}: a stand-in for a training
script with two hyperparameters and a metric on a JSON line. A diverging run reports its last finite
loss as 1e9 rather than crashing.
"""

import argparse
import json
import math
import random


def loss_and_grad(x: float, y: float) -> tuple[float, float, float]:
    loss = (1 - x) ** 2 + 100 * (y - x * x) ** 2
    return loss, -2 * (1 - x) - 400 * x * (y - x * x), 200 * (y - x * x)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--lr", type=float, required=True)
    p.add_argument("--momentum", type=float, required=True)
    p.add_argument("--steps", type=int, default=2000)
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args()
    rng = random.Random(a.seed)
    x, y = rng.uniform(-2, 0), rng.uniform(-1, 3)
    vx = vy = 0.0
    loss = math.inf
    for step in range(1, a.steps + 1):
        loss, gx, gy = loss_and_grad(x, y)
        if not math.isfinite(loss) or loss > 1e9:
            loss = 1e9
            break
        vx, vy = a.momentum * vx - a.lr * gx, a.momentum * vy - a.lr * gy
        x, y = x + vx, y + vy
        if step % 500 == 0:
            print(json.dumps({"step": step, "loss": loss}), flush=True)
    print(json.dumps({"loss": loss, "steps": a.steps}))


if __name__ == "__main__":
    main()
