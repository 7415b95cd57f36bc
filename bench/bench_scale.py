"""Labeling at scale on this machine: memory and time from 20,000 to 200,000 images, a manifest
of 1,000,000 rows, and the driver's memory for manifests of 500,000 and 5,000,000 rows.

    python bench/bench_scale.py                                   # 20k and 200k lakes, 1M-row manifest
    python bench/bench_scale.py --sizes 20000 200000 --manifest-rows 300000   # a shorter manifest run
    python bench/bench_scale.py --sizes 0 0 --manifest-rows 0 --driver-rows 500000 5000000  # driver memory only

Local only: it measures this machine, so it is not meant for `ray job submit`.

Inputs are real files on local disk: the 50,000 CIFAR-10 train JPEGs (32x32) of
../shared/data/cifar10-train-jpg.tar.gz extracted once, then hard-linked as copies
`copy<k>/<class>/<n>.jpg` (a hard link is a file like any other to listing, stat and open).
A lake of N images holds N such links; the manifest is a Parquet file with a `path` column of
--manifest-rows distinct absolute paths of links in another folder (every row a real, distinct image).

Each run is `distcls label --input LAKE` (or `--manifest FILE`) in its own process with a private
local Ray (RAY_ADDRESS=local), started once the machine is idle. psutil samples every 0.5 s the
RSS of the driver (the CLI process) and of the whole Ray session: every process of the run (driver,
GCS, raylet, agents, workers, actors). The plain RSS sum counts the shared object store and
libraries once per process; the sum less shared pages is printed beside it. Targets: session
and driver peak at 200k <= 1.25x the peak at 20k; images/s about the same at both sizes.

--driver-rows A B: two manifests of A and B distinct paths that need no images: every path lies
outside the run's --allowed-roots, so each becomes an "outside allowed roots" row that is never
read, yet goes through the whole pipeline (inference actors, writers, staged counts, commit).
Target: driver peak RSS at B <= 1.25x at A: the inputs are read, de-duplicated and put into the
object store by a Ray actor (distcls.inputs.InputReader), whose own peak RSS is printed as "reader"
(it holds 8 bytes per distinct path and the refs of the blocks); the driver holds refs and counts.
RSS less shared pages is printed beside each: pages of the object store a process wrote count as
shared.
The model is `resnet_small` with seeded random weights (inference cost does not depend on them).
"""
from __future__ import annotations

import argparse
import os
import platform
import sys
import tarfile
import tempfile
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from bench_label import TARBALL, make_model, run_timed

CIFAR_IMAGES = 50_000


def extract(target: Path) -> list[Path]:
    """The 50,000 CIFAR-10 JPEGs below ``target``, sorted."""
    with tarfile.open(TARBALL) as archive:
        archive.extractall(target, filter="data")
    return sorted((target / "train").rglob("*.jpg"))


def link_lake(sources: list[Path], root: Path, images: int) -> list[str]:
    """``images`` hard links to the sources below ``root``, as copy<k>/<class>/<n>.jpg; their paths."""
    links = []
    for i in range(images):
        copy, index = divmod(i, len(sources))
        source = sources[index]
        link = root / f"copy{copy:02d}" / source.parent.name / source.name
        link.parent.mkdir(parents=True, exist_ok=True)
        os.link(source, link)
        links.append(str(link))
    return links


def label_run(inputs: list[str], model: str, output: Path) -> dict:
    """One `distcls label` process, sampled; the summary's numbers plus wall time and peak RSS."""
    got = run_timed([sys.executable, "-m", "distcls", "label", *inputs, "--model", model, "--output", str(output)],
                    worker_tag="InputReader")
    return {k: got[k] for k in ("images", "errors", "images_per_s", "seconds", "wall_s", "other_cpu_s",
                                "driver_rss_gib", "driver_private_gib", "tree_rss_gib", "tree_private_gib",
                                "worker_rss_gib", "worker_private_gib")}


def outside_manifest(path: Path, rows: int) -> None:
    """A Parquet manifest of ``rows`` distinct paths below /distcls-bench-absent (no such folder)."""
    writer = None
    for start in range(0, rows, 1_000_000):
        paths = [f"/distcls-bench-absent/{i // 1000:05d}/{i:08d}.jpg" for i in range(start, min(rows, start + 1_000_000))]
        table = pa.table({"path": pa.array(paths, pa.string())})
        writer = writer or pq.ParquetWriter(path, table.schema)
        writer.write_table(table)
    writer.close()


def report(args: argparse.Namespace, runs: dict[str, dict]) -> None:
    print(f"machine: {platform.node()}, os.cpu_count()={os.cpu_count()}, {platform.platform()}, "
          f"python {platform.python_version()}")
    print(f"command: python bench/bench_scale.py {' '.join(sys.argv[1:])}")
    print("input: hard links to the 50,000 CIFAR-10 train JPEGs (32x32) on local disk; model resnet_small, "
          "seeded random weights; one run each")
    print(f"{'run':36s}{'images':>10s}{'errors':>10s}{'wall s':>8s}{'label() s':>10s}{'pipeline img/s':>15s}"
          f"{'driver GiB':>11s}{'less shared':>12s}{'reader GiB':>11s}{'less shared':>12s}"
          f"{'session GiB':>12s}{'less shared':>12s}{'noise CPU-s':>12s}")
    for name, r in runs.items():
        print(f"{name:36s}{r['images']:10d}{r['errors']:10d}{r['wall_s']:8.0f}{r['seconds']:10.0f}"
              f"{r['images_per_s']:15.0f}{r['driver_rss_gib']:11.2f}{r['driver_private_gib']:12.2f}"
              f"{r['worker_rss_gib']:11.2f}{r['worker_private_gib']:12.2f}"
              f"{r['tree_rss_gib']:12.2f}{r['tree_private_gib']:12.2f}{r['other_cpu_s']:12.1f}")
    print(f"load (uptime) at the end: {', '.join(f'{x:.1f}' for x in os.getloadavg())}")
    if args.driver_rows:
        small, big = (runs[f"outside-roots manifest {n:,}"] for n in args.driver_rows)
        for key, what in (("driver_rss_gib", "driver"), ("driver_private_gib", "driver less shared")):
            print(f"peak RSS {what}: {args.driver_rows[1]:,} / {args.driver_rows[0]:,} rows = "
                  f"{big[key] / small[key]:.2f}x (target <= 1.25x)")
    if not all(args.sizes):
        return
    small, big = (runs[f"lake {n:,}"] for n in args.sizes[:2])
    for key, what in (("driver_rss_gib", "driver"), ("tree_rss_gib", "session"), ("tree_private_gib", "session less shared")):
        print(f"peak RSS {what}: {args.sizes[1]:,} / {args.sizes[0]:,} = {big[key] / small[key]:.2f}x (target <= 1.25x)")
    print(f"pipeline images/s: {small['images_per_s']:.0f} at {args.sizes[0]:,}, {big['images_per_s']:.0f} at "
          f"{args.sizes[1]:,} ({big['images_per_s'] / small['images_per_s']:.2f}x; 1.00x = time grows linearly)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs=2, default=[20_000, 200_000], help="the two lake sizes")
    parser.add_argument("--manifest-rows", type=int, default=1_000_000, help="0: no manifest run")
    parser.add_argument("--driver-rows", type=int, nargs=2, default=None, metavar=("A", "B"),
                        help="two manifests of paths outside --allowed-roots (no images): driver memory at A and B rows")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(dir="/tmp") as tmp_dir:
        tmp = Path(tmp_dir)
        sources = extract(tmp / "cifar") if any(args.sizes) or args.manifest_rows else []
        model = make_model(tmp / "model")
        runs = {}
        for n in args.driver_rows or []:
            outside_manifest(tmp / f"outside{n}.parquet", n)
            (tmp / "roots").mkdir(exist_ok=True)
            runs[f"outside-roots manifest {n:,}"] = label_run(
                ["--manifest", str(tmp / f"outside{n}.parquet"), "--allowed-roots", str(tmp / "roots")],
                model, tmp / f"out-outside{n}")
        for n in filter(None, args.sizes):
            link_lake(sources, tmp / f"lake{n}", n)
            runs[f"lake {n:,}"] = label_run(["--input", str(tmp / f"lake{n}")], model, tmp / f"out{n}")
        if args.manifest_rows:
            paths = link_lake(sources, tmp / "many", args.manifest_rows)
            pq.write_table(pa.table({"path": pa.array(paths, pa.string())}), tmp / "manifest.parquet")
            del paths
            runs[f"manifest {args.manifest_rows:,} rows"] = label_run(
                ["--manifest", str(tmp / "manifest.parquet")], model, tmp / "out-manifest")
        report(args, runs)


if __name__ == "__main__":
    main()
