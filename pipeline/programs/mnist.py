#!/usr/bin/env python3
"""Train the seed's MNIST model once; print one JSON line per epoch, then its test accuracy as the last line.

    python3 mnist.py --data mnist.npz --size 128 --dropout 0.2 [--epochs 1] [--lr 0.001] [--seed 0]

A standalone program: it imports nothing of the project. The npz must hold x_train, y_train, x_test,
y_test (images 28x28 as in keras.datasets.mnist). After each epoch a line such as
{"epoch": 3, "val_accuracy": 0.9512, "loss": 0.17} goes to stdout (flushed at once): the accuracy on a
validation split held out of the training data (--validation, the last 10% by default), never the test set,
so a search may choose by it. The last line is the test accuracy alone.
"""

import argparse
import json
import os
import sys

REQUIRED_KEYS = ("x_train", "y_train", "x_test", "y_test")


def positive_int(text):
    value = int(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {value}")
    return value


def positive_float(text):
    value = float(text)
    if not value > 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"must be a number > 0, got {text}")
    return value


def fraction(text):
    value = float(text)
    if not 0.0 < value < 1.0:
        raise argparse.ArgumentTypeError(f"must be in (0, 1), got {value}")
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
    p.add_argument("--lr", type=positive_float, default=0.001, help="Adam's learning rate (default 0.001)")
    p.add_argument(
        "--validation",
        type=fraction,
        default=0.1,
        help="fraction of the training data held out to validate each epoch (default 0.1)",
    )
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
    optimizer = tf.keras.optimizers.Adam(learning_rate=args.lr)
    model.compile(optimizer=optimizer, loss="sparse_categorical_crossentropy", metrics=["accuracy"])
    held = max(1, int(len(x_train) * args.validation))
    x_val, y_val = x_train[-held:], y_train[-held:]
    x_fit, y_fit = x_train[:-held], y_train[:-held]

    class EpochLine(tf.keras.callbacks.Callback):
        def on_epoch_end(self, epoch, logs=None):
            logs = logs or {}
            line = {"epoch": epoch + 1, "val_accuracy": round(float(logs.get("val_accuracy", float("nan"))), 6)}
            line["loss"] = round(float(logs.get("loss", float("nan"))), 6)
            print(json.dumps(line), flush=True)

    model.fit(x_fit, y_fit, epochs=args.epochs, validation_data=(x_val, y_val), verbose=0, callbacks=[EpochLine()])
    _, accuracy = model.evaluate(x_test, y_test, verbose=0)
    print(f"{accuracy:.6f}")


if __name__ == "__main__":
    main()
