#!/usr/bin/env python3
"""Train the seed's MNIST model once and print its test accuracy as the last line of stdout.

    python3 mnist.py --data mnist.npz --size 128 --dropout 0.2 [--epochs 1] [--seed 0]

A standalone program: it imports nothing of the project. The npz must hold x_train, y_train, x_test,
y_test (images 28x28 as in keras.datasets.mnist). Nothing but the accuracy goes to stdout.
"""

import argparse
import os
import sys

REQUIRED_KEYS = ("x_train", "y_train", "x_test", "y_test")


def positive_int(text):
    value = int(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {value}")
    return value


def dropout_rate(text):
    value = float(text)
    if not 0.0 <= value < 1.0:
        raise argparse.ArgumentTypeError(f"must be in [0, 1), got {value}")
    return value


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", required=True, help="npz with x_train, y_train, x_test, y_test")
    p.add_argument("--size", type=positive_int, required=True, help="hidden layer size")
    p.add_argument("--dropout", type=dropout_rate, required=True, help="dropout rate in [0, 1)")
    p.add_argument("--epochs", type=positive_int, default=1)
    p.add_argument("--seed", type=int, default=None, help="seed for reproducible weights and shuffling")
    p.add_argument(
        "--threads",
        type=int,
        default=None,
        help="TensorFlow threads (default: $OMP_NUM_THREADS, else TensorFlow's choice)",
    )
    return p.parse_args(argv)


def load(path):
    import numpy as np

    try:
        with np.load(path) as f:
            missing = [k for k in REQUIRED_KEYS if k not in f.files]
            if missing:
                sys.exit(f"mnist.py: {path} lacks {', '.join(missing)} (has {', '.join(f.files)})")
            return tuple(f[k] for k in REQUIRED_KEYS)
    except (OSError, ValueError) as e:
        sys.exit(f"mnist.py: cannot read {path} as an npz file: {e}")


def main(argv=None):
    args = parse_args(argv)
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    x_train, y_train, x_test, y_test = load(args.data)
    import tensorflow as tf

    threads = args.threads
    if threads is None and os.environ.get("OMP_NUM_THREADS", "").isdigit():
        threads = int(os.environ["OMP_NUM_THREADS"])
    if threads:
        tf.config.threading.set_intra_op_parallelism_threads(threads)
        tf.config.threading.set_inter_op_parallelism_threads(threads)
    if args.seed is not None:
        tf.keras.utils.set_random_seed(args.seed)

    x_train = x_train.astype("float32") / 255.0
    x_test = x_test.astype("float32") / 255.0
    model = tf.keras.models.Sequential(
        [
            tf.keras.Input(shape=x_train.shape[1:]),
            tf.keras.layers.Flatten(),
            tf.keras.layers.Dense(args.size, activation="relu"),
            tf.keras.layers.Dropout(args.dropout),
            tf.keras.layers.Dense(10, activation="softmax"),
        ]
    )
    model.compile(optimizer="adam", loss="sparse_categorical_crossentropy", metrics=["accuracy"])
    model.fit(x_train, y_train, epochs=args.epochs, verbose=0)
    _, accuracy = model.evaluate(x_test, y_test, verbose=0)
    print(f"{accuracy:.6f}")


if __name__ == "__main__":
    main()
