"""Training benchmarks on this machine: Ray Train vs a plain loop, and time-to-accuracy.

    python bench/bench_train.py throughput [--images 10000] [--epochs 3]
    python bench/bench_train.py accuracy  [--config jobs/configs/cifar10_train.yaml] [distcls train flags]
    python bench/bench_train.py accuracy  --model simple_cnn --epochs 10 --lr 0.05

`throughput`: images/s of `distcls train` (Ray Train, 2 workers x 1 thread, DDP over gloo) against
a plain single-process loop with 2 torch threads, on the same model, decoded data, global batch
size, augmentation and per-epoch evaluation; the plain loop calls the very same `train_epoch` and
`eval_epoch` functions. Epoch 1 is warm-up and not counted. The two alternate (Ray, plain, Ray,
plain) so that machine noise hits both. Ratio = Ray / plain (target >= 0.95).

`accuracy`: the default recipe end to end on the full CIFAR-10 train lake from
../shared/data (45,000 train / 5,000 held out, stratified, seed 0): wall time of the whole
`distcls train` command (Ray start, decode, training, artifact), then `distcls evaluate` on the
held-out manifest it wrote. Target: >= 85% held-out accuracy within 15 minutes.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
TARBALL = REPO.parent / "shared" / "data" / "cifar10-train-jpg.tar.gz"


def unpack(target: Path, per_class: int | None) -> Path:
    with tarfile.open(TARBALL) as archive:
        members = [m for m in archive.getmembers() if m.isfile() and m.name.endswith(".jpg")
                   and (per_class is None or int(Path(m.name).stem) < per_class)]
        archive.extractall(target, members=members, filter="data")
    return target / "train"


def machine() -> str:
    return f"{platform.node()} {os.cpu_count()} CPUs, torch {torch.__version__}, python {platform.python_version()}"


def ray_epoch_rate(lake: Path, out: Path, epochs: int, batch: int) -> float:
    command = [sys.executable, "-m", "distcls", "train", "--data", str(lake), "--output", str(out),
               "--epochs", str(epochs), "--batch-size", str(batch), "--workers", "2", "--cpus-per-worker", "1"]
    subprocess.run(command, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return float(np.mean([r["images_per_s"] for r in rows[1:]]))


def plain_epoch_rate(lake: Path, epochs: int, batch: int) -> float:
    """The same epoch functions in one process, 2 threads, no Ray, no DDP."""
    from distcls import lake as lakes
    from distcls.config import StorageConfig, TrainConfig
    from distcls.images import read_batch
    from distcls.models import create_model
    from distcls.train import eval_epoch, train_epoch

    torch.set_num_threads(2)
    config = TrainConfig(data=str(lake), output="unused", epochs=epochs, batch_size=batch, workers=1)
    rows, classes = lakes.labelled_images(str(lake), StorageConfig())
    train_idx, val_idx = lakes.stratified_split(rows["label"].to_numpy(), config.val_fraction, config.seed)
    decoded = read_batch(rows["path"].to_numpy(zero_copy_only=False), StorageConfig(), config.image_size)
    images, labels = torch.from_numpy(decoded["image"]), torch.from_numpy(rows["label"].to_numpy().astype(np.int64))
    torch.manual_seed(0)
    model = create_model(config.model, num_classes=len(classes)).to(memory_format=torch.channels_last)
    optimizer = torch.optim.SGD(model.parameters(), lr=config.lr, momentum=0.9, nesterov=True, weight_decay=config.weight_decay)
    state = {"mean": (0.49, 0.48, 0.45), "std": (0.25, 0.24, 0.26)}
    steps = len(train_idx) // batch
    generator, device = torch.Generator().manual_seed(0), torch.device("cpu")
    rates = []
    for epoch in range(epochs):
        started = time.time()
        train_epoch(model, optimizer, images[train_idx], labels[train_idx], state, config, epoch, steps, batch, generator, device)
        eval_epoch(model, images[val_idx], labels[val_idx], state, device)
        rates.append(steps * batch / (time.time() - started))
    return float(np.mean(rates[1:]))


def throughput(args: argparse.Namespace) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        lake = unpack(Path(tmp), args.images // 10)
        ray_rates, plain_rates = [], []
        for trial in range(args.trials):
            ray_rates.append(ray_epoch_rate(lake, Path(tmp) / f"ray{trial}", args.epochs, args.batch_size))
            plain_rates.append(plain_epoch_rate(lake, args.epochs, args.batch_size))
    ray_rate, plain_rate = float(np.median(ray_rates)), float(np.median(plain_rates))
    print(f"machine: {machine()}")
    print(f"input: {args.images} CIFAR-10 images, resnet_small, global batch {args.batch_size}, {args.epochs} epochs "
          f"(first not counted), {args.trials} alternating trials, medians")
    print(f"ray train 2 workers x 1 thread: {ray_rate:8.0f} images/s   {[round(r) for r in ray_rates]}")
    print(f"plain loop 1 process x 2 threads: {plain_rate:6.0f} images/s   {[round(r) for r in plain_rates]}")
    print(f"ratio ray/plain: {ray_rate / plain_rate:.2f}x (target >= 0.95)")


def accuracy(args: argparse.Namespace) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        lake = unpack(Path(tmp), None)
        out = Path(tmp) / "run"
        started = time.time()
        subprocess.run([sys.executable, "-m", "distcls", "train", "--config", args.config, "--data", str(lake),
                        "--output", str(out), *args.extra], check=True)
        train_s = time.time() - started
        result = subprocess.run([sys.executable, "-m", "distcls", "evaluate", "--data", str(out / "val.parquet"),
                                 "--model", str(out / "model")], check=True, capture_output=True, text=True)
        scores = json.loads(result.stdout.strip().splitlines()[-1])
        history = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    print(f"machine: {machine()}")
    print(f"command: distcls train --config {args.config} --data <cifar10 train lake> --output <tmp> {' '.join(args.extra)}")
    for row in history:
        print(f"  epoch {row['epoch']:2d}  val_acc {row['val_accuracy']:.4f}  {row['images_per_s']:.0f} img/s  {row['elapsed_s']:.0f}s")
    print(f"wall time of distcls train: {train_s:.0f} s ({train_s / 60:.1f} min, target <= 15 min)")
    print(f"held-out accuracy (distcls evaluate on {scores['images']} images never trained on): "
          f"{scores['accuracy']:.4f} (target >= 0.85)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="bench", required=True)
    t = sub.add_parser("throughput")
    t.add_argument("--images", type=int, default=10000)
    t.add_argument("--epochs", type=int, default=3)
    t.add_argument("--batch-size", type=int, default=256)
    t.add_argument("--trials", type=int, default=2)
    a = sub.add_parser("accuracy")
    a.add_argument("--config", default=str(REPO / "jobs/configs/cifar10_train.yaml"))
    args, extra = parser.parse_known_args()
    args.extra = extra  # accuracy: further `distcls train` flags, e.g. --model simple_cnn --lr 0.02
    {"throughput": throughput, "accuracy": accuracy}[args.bench](args)


if __name__ == "__main__":
    main()
