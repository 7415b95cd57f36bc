"""Labeling benchmark on this machine: `distcls label` vs a plain loop vs Ray Data's documented recipe.

    python bench/bench_label.py                        # 5,000 CIFAR-10 images upscaled to 640x480 JPEG q90
    python bench/bench_label.py --small                # the same 5,000 as the original 32x32 JPEGs
    python bench/bench_label.py --images 5000 --trials 3 --size 640x480
    python bench/bench_label.py --engines              # `distcls label --engine torch` vs `--engine onnx`

Local only: it times this machine, so it is not meant for `ray job submit`.

The lake is the first N/10 images per class of ../shared/data/cifar10-train-jpg.tar.gz, in a temp
dir on local disk (upscaled with bicubic and saved at JPEG quality 90 unless --small). The model is
`resnet_small` with seeded random weights saved as a real artifact (`artifact.save_model`):
inference cost does not depend on the weights, so no training is needed to time it.

Three ways to label the same lake with the same model, run alternately (a, b, c, a, b, c, ...) so
that machine noise hits all of them, each in its own process (with --engines: (a) once per
inference engine instead, the artifact exported to ONNX beforehand as `distcls export` does):

(a) `distcls label --input LAKE --model MODEL --output OUT --overwrite`, the CLI as users run it.
(b) A plain single-process loop, the baseline a competent user would write without Ray: a thread
    pool of os.cpu_count() threads does the full PIL decode + resize (Pillow releases the GIL, so
    decoding uses every core and runs ahead of inference), torch uses os.cpu_count() threads on
    batches of 256, pyarrow writes one Parquet file.
(c) Ray Data's documented batch-inference recipe: `read_images(lake, size=(s, s), mode="RGB")` ->
    `map_batches` normalisation -> `map_batches(Classifier, concurrency=...)` actors -> `write_parquet`.

Reported per run: wall time of the whole process (Python start, imports, Ray start, shutdown:
what a user waits for) and the work alone (after imports and Ray start; for (a) the pipeline rate
that its `_SUCCESS` summary reports). Ratios are of medians.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

IMPORTS_STARTED = time.time()  # a child process reports how long its imports took (distcls imports ray)

import numpy as np  # noqa: E402
import psutil  # noqa: E402
import pyarrow as pa
import pyarrow.compute  # noqa: F401 - pa.compute
import pyarrow.parquet as pq
import torch
from PIL import Image, ImageOps

from distcls.artifact import ModelInfo, load_model, predict_proba, read_info, save_model
from distcls.storage import Store
from distcls.models import create_model

REPO = Path(__file__).resolve().parents[1]
TARBALL = REPO.parent / "shared" / "data" / "cifar10-train-jpg.tar.gz"
CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
BATCH = 256


# ---------------------------------------------------------------------------------------------
# Inputs: a lake and a model artifact


def make_lake(target: Path, images: int, size: tuple[int, int] | None) -> Path:
    """The first images/10 of each CIFAR-10 class as ``target/train/<class>/<n>.jpg``; upscaled
    to ``size`` and re-encoded at quality 90 unless ``size`` is None."""
    with tarfile.open(TARBALL) as archive:
        members = [m for m in archive.getmembers() if m.isfile() and m.name.endswith(".jpg")
                   and int(Path(m.name).stem) < images // 10]
        archive.extractall(target, members=members, filter="data")
    files = sorted((target / "train").rglob("*.jpg"))
    if size:
        with ThreadPoolExecutor(os.cpu_count()) as pool:  # Pillow releases the GIL while resizing/encoding
            list(pool.map(lambda f: _upscale(f, size), files))
    return target / "train"


def _upscale(file: Path, size: tuple[int, int]) -> None:
    with Image.open(file) as image:
        big = image.convert("RGB").resize(size, Image.Resampling.BICUBIC)
    big.save(file, quality=90)


def make_model(target: Path, image_size: int = 32) -> str:
    """A seeded random resnet_small saved as an artifact (inference cost does not depend on weights)."""
    torch.manual_seed(0)
    info = ModelInfo(arch="resnet_small", classes=CLASSES, image_size=image_size,
                     mean=(0.49, 0.48, 0.45), std=(0.25, 0.24, 0.26))
    save_model(create_model("resnet_small", len(CLASSES)), info, Store(str(target)))
    return str(target)


# ---------------------------------------------------------------------------------------------
# (b) the plain loop and (c) Ray's recipe; each runs in its own process (see `main`)


def plain_loop(lake: str, model_uri: str, output: str) -> dict:
    """Full decode + resize in a thread pool, batched torch inference on all cores, one Parquet file."""
    started = time.time()
    torch.set_num_threads(os.cpu_count())
    model, info = load_model(Store(model_uri))
    paths = sorted(str(p) for p in Path(lake).rglob("*.jpg"))
    classes = np.array(info.classes)
    with ThreadPoolExecutor(os.cpu_count()) as pool, pq.ParquetWriter(output, PLAIN_SCHEMA) as writer:
        decoded = pool.map(lambda p: _full_decode(p, info.image_size), paths)  # runs ahead of inference
        for start in range(0, len(paths), BATCH):
            pixels, sizes = zip(*(next(decoded) for _ in paths[start:start + BATCH]))
            probs = predict_proba(model, info, np.stack(pixels)).numpy()
            ids = probs.argmax(1)
            width, height = np.array(sizes, dtype=np.int32).T
            writer.write_table(pa.table({
                "path": paths[start:start + BATCH], "label": classes[ids], "label_id": ids.astype(np.int32),
                "score": probs.max(1), "width": width, "height": height, "labeled_at": _now(len(ids))},
                schema=PLAIN_SCHEMA))
    seconds = time.time() - started
    return {"after_imports_s": seconds, "work_s": seconds}


PLAIN_SCHEMA = pa.schema([("path", pa.string()), ("label", pa.string()), ("label_id", pa.int32()),
                          ("score", pa.float32()), ("width", pa.int32()), ("height", pa.int32()),
                          ("labeled_at", pa.timestamp("us", tz="UTC"))])


def _now(rows: int) -> pa.Array:
    """When a batch was labelled, as (a) records it, for the steady-state rate."""
    return pa.array(np.full(rows, int(time.time() * 1e6)), pa.timestamp("us", tz="UTC"))


def _full_decode(path: str, size: int) -> tuple[np.ndarray, tuple[int, int]]:
    """What torchvision-style code does: decode every pixel, shorter side to ``size``, centre crop."""
    with Image.open(path) as image:
        image = ImageOps.exif_transpose(image).convert("RGB")
    return np.asarray(ImageOps.fit(image, (size, size), Image.Resampling.BILINEAR)), image.size


def ray_recipe(lake: str, model_uri: str, output: str) -> dict:
    """https://docs.ray.io/en/latest/data/batch_inference.html with an image model, on CPUs."""
    import ray  # here, so that (b) does not pay for importing it

    started = time.time()
    info = read_info(Store(model_uri))
    ray.init(include_dashboard=False, logging_level="WARNING")
    working = time.time()
    mean, std = np.array(info.mean, np.float32), np.array(info.std, np.float32)
    # Not info.classes inside __call__: cloudpickle would then try to ship the unpicklable
    # torch.classes module along with the function (it matches attribute names to submodules).
    names = np.array(info.classes)

    def preprocess(batch: dict) -> dict:
        pixels = (batch["image"].astype(np.float32) / 255.0 - mean) / std
        return {"path": batch["path"], "image": pixels.transpose(0, 3, 1, 2)}

    class Classifier:
        def __init__(self) -> None:
            self.model, _ = load_model(Store(model_uri))

        def __call__(self, batch: dict) -> dict:
            with torch.inference_mode():
                probs = torch.softmax(self.model(torch.as_tensor(batch["image"])), dim=1).numpy()
            return {"path": batch["path"], "label": names[probs.argmax(1)], "score": probs.max(1),
                    "labeled_at": _now(len(probs))}  # not in the recipe: for the steady-state rate

    # Actors take one CPU each (Ray's default); the read tasks need the others.
    actors = max(1, (os.cpu_count() or 2) // 2)
    size = (info.image_size, info.image_size)
    dataset = ray.data.read_images(lake, size=size, mode="RGB", include_paths=True)
    dataset = dataset.map_batches(preprocess, batch_format="numpy")
    dataset = dataset.map_batches(Classifier, concurrency=actors, batch_size=BATCH, batch_format="numpy")
    dataset.write_parquet(output)
    return {"after_imports_s": time.time() - started, "work_s": time.time() - working}


# ---------------------------------------------------------------------------------------------
# Timing


class ProcessSampler:
    """Every 0.5 s: RSS of a process tree (peak of the root, peak of the sum, peak of the sum less
    shared pages: the object store and libraries count once per process in the plain sum) and the
    CPU seconds used by processes outside it: other people's work on a shared machine shows up as noise.
    With ``worker_tag``, also the peak RSS (and RSS less shared pages) of the largest single process
    of the tree whose command line contains it (e.g. "RayTrainWorker")."""

    def __init__(self, root_pid: int, worker_tag: str | None = None) -> None:
        self.root = psutil.Process(root_pid)
        self.worker_tag = worker_tag
        self.peak_root_rss = self.peak_root_private = self.peak_tree_rss = self.peak_tree_private = 0
        self.peak_worker_rss = self.peak_worker_private = 0
        self.other_cpu_s = 0.0
        self._cpu: dict[int, float] = {}  # CPU seconds of each process outside the tree, last sample
        self._first = True
        # Ray's object store is a file in /dev/shm (Linux): its growth is what the run's objects
        # took at most. Other sessions' Rays on the machine add to it; none here is the noise-free case.
        self._shm_start = self._shm() or 0
        self.peak_shm = 0

    @staticmethod
    def _shm() -> int | None:
        return shutil.disk_usage("/dev/shm").used if os.path.isdir("/dev/shm") else None

    def sample(self) -> None:
        try:
            tree = {self.root.pid} | {p.pid for p in self.root.children(recursive=True)}
        except psutil.NoSuchProcess:
            return
        tree_rss = tree_private = 0
        for proc in psutil.process_iter(["pid", "cpu_times", "memory_info"]):
            pid, cpu, memory = proc.info["pid"], proc.info["cpu_times"], proc.info["memory_info"]
            if cpu is None or memory is None:
                continue
            used = cpu.user + cpu.system
            if pid in tree:
                # Recorded for the tree too: Ray workers still exiting after the root has gone
                # leave the tree, and only what they use after that is someone else's load.
                self._cpu[pid] = used
                tree_rss += memory.rss
                tree_private += memory.rss - memory.shared
                if pid == self.root.pid:
                    self.peak_root_rss = max(self.peak_root_rss, memory.rss)
                    self.peak_root_private = max(self.peak_root_private, memory.rss - memory.shared)
                if self.worker_tag and any(self.worker_tag in part for part in _cmdline(proc)):
                    self.peak_worker_rss = max(self.peak_worker_rss, memory.rss)
                    self.peak_worker_private = max(self.peak_worker_private, memory.rss - memory.shared)
            elif pid != os.getpid():
                # A process first seen after the first sample started during the run: count all of it.
                self.other_cpu_s += used - self._cpu.get(pid, used if self._first else 0.0)
                self._cpu[pid] = used
        self._first = False
        self.peak_shm = max(self.peak_shm, (self._shm() or 0) - self._shm_start)
        self.peak_tree_rss = max(self.peak_tree_rss, tree_rss)
        self.peak_tree_private = max(self.peak_tree_private, tree_private)


def _cmdline(proc: psutil.Process) -> list[str]:
    try:
        return proc.cmdline()
    except psutil.Error:
        return []


def wait_quiet(max_wait_s: float = 120, busy_percent: float = 15) -> float:
    """Wait (up to max_wait_s) until the machine is idle for 3 s in a row and runs no other Ray
    (a second local Ray finds the dashboard agent's fixed port taken and retries for ~4 s).
    Returns the seconds waited."""
    started = time.time()
    while time.time() - started < max_wait_s:
        other_ray = any(p.info["name"] == "raylet" for p in psutil.process_iter(["name"]))
        if psutil.cpu_percent(interval=3) < busy_percent and not other_ray:
            break
    return time.time() - started


def run_timed(command: list[str], worker_tag: str | None = None) -> dict:
    """Run ``command`` in a new process once the machine is idle: its wall time, peak RSS of the
    process and of its tree (and of its largest ``worker_tag`` process), other processes' CPU seconds
    meanwhile, plus the JSON it prints last."""
    waited = wait_quiet()
    started = time.time()
    # RAY_ADDRESS=local: a Ray of our own, even when a cluster started by someone else runs here.
    # Output to files, not pipes: a long run's progress lines would fill a pipe read only at the
    # end, and the child would block writing them.
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        child = subprocess.Popen(command, stdout=out, stderr=err, text=True, cwd=REPO,
                                 env={**os.environ, "RAY_ADDRESS": "local"})
        sampler = ProcessSampler(child.pid, worker_tag)
        while child.poll() is None:
            sampler.sample()
            time.sleep(0.5)
        wall = time.time() - started
        out.seek(0), err.seek(0)
        stdout, stderr = out.read(), err.read()
    if child.returncode:
        raise SystemExit(f"{' '.join(command)} failed:\n{stderr[-3000:]}")
    return {"wall_s": wall, "waited_s": waited, "other_cpu_s": sampler.other_cpu_s,
            "driver_rss_gib": sampler.peak_root_rss / 2**30, "driver_private_gib": sampler.peak_root_private / 2**30,
            "tree_rss_gib": sampler.peak_tree_rss / 2**30,
            "tree_private_gib": sampler.peak_tree_private / 2**30,
            "worker_rss_gib": sampler.peak_worker_rss / 2**30, "worker_private_gib": sampler.peak_worker_private / 2**30,
            "shm_gib": sampler.peak_shm / 2**30, **json.loads(stdout.strip().splitlines()[-1])}


def trial(way: str, lake: Path, model: str, out: Path, n: int, attempts: int = 4) -> dict:
    """One run of way a, b or c, repeated (up to ``attempts`` times) while other processes took
    more than a tenth of the machine's CPU during it. Returns seconds (wall_s, after_imports_s,
    work_s, steady_s), peak RSS, and ``repeats``: the noisy runs discarded."""
    for repeats in range(attempts):
        got = _one_trial(way, lake, model, out, n)
        if got["other_cpu_s"] <= 0.1 * got["wall_s"] * os.cpu_count():
            break
    return {**got, "repeats": repeats}


def _one_trial(way: str, lake: Path, model: str, out: Path, n: int) -> dict:
    if way == "a" or way in ENGINE_WAYS:
        engine = "torch" if way == "a" else way
        got = run_timed([sys.executable, "-m", "distcls", "label", "--input", str(lake), "--model", model,
                         "--output", str(out / way), "--overwrite", "--engine", engine])
        assert got["images"] == n, got
        measured = {k: v for k, v in got.items() if k.endswith(("_s", "_gib")) and k != "images_per_s"}
        got = {**measured, "after_imports_s": got["seconds"], "work_s": n / got["images_per_s"]}
    else:
        shutil.rmtree(out / way, ignore_errors=True)  # write_parquet appends to an existing folder
        out.mkdir(exist_ok=True)
        got = run_timed([sys.executable, str(Path(__file__).resolve()), f"_{way}", str(lake), model, str(out / way)])
    return {**got, "steady_s": steady_seconds(out / way, n)}


def check_rows(out: Path, n: int, ways: dict[str, str]) -> None:
    """Each way wrote one row per image. (Top-1 agreement between them would say nothing here:
    a model with random weights gives nearly every image the same class.)"""
    for way in ways:
        paths = pq.read_table(out / way, columns=["path"])["path"]
        assert len(paths) == n and pa.compute.count_distinct(paths).as_py() == n, (way, len(paths))


def steady_seconds(output: Path, n: int) -> float:
    """Seconds a run would take at its steady rate: between its first and last labelled batch
    (``labeled_at``), so without worker start-up, model loading and the final write."""
    stamps = pq.read_table(output, columns=["labeled_at"])["labeled_at"].cast(pa.int64()).to_numpy() / 1e6
    first = stamps.min()
    return n * (stamps.max() - first) / (n - np.count_nonzero(stamps == first))


WAYS = {"a": "distcls label (CLI)", "b": "plain loop, 1 process", "c": "Ray Data recipe"}
ENGINE_WAYS = {"torch": "label --engine torch", "onnx": "label --engine onnx"}


COLUMNS = {  # column -> (seconds key, what it counts)
    "process": ("wall_s", "the whole process: Python start, imports, Ray start and shutdown"),
    "no imports": ("after_imports_s", "after imports: (a) label() incl. Ray start, (c) incl. ray.init"),
    "work": ("work_s", "(a) the pipeline rate in _SUCCESS, (c) after ray.init; both incl. Ray worker start"),
    "steady": ("steady_s", "first to last labelled batch: no start-up, model loading or final write"),
}


def report(args: argparse.Namespace, lake_text: str, times: dict[str, list[dict]], ways: dict[str, str]) -> None:
    n = args.images
    print(f"machine: {platform.node()}, os.cpu_count()={os.cpu_count()}, {platform.platform()}, "
          f"python {platform.python_version()}, torch {torch.__version__}")
    print(f"command: python bench/bench_label.py {' '.join(sys.argv[1:])}")
    print(f"input: {lake_text}")
    print(f"model: resnet_small, 32x32 input, seeded random weights saved with artifact.save_model (inference "
          f"cost does not depend on weights); batch {BATCH}; {args.trials} alternating trials, medians")
    print("images/s, median of the trials; all trials in brackets")
    for column, (_, meaning) in COLUMNS.items():
        print(f"  {column:>10s}: {meaning}")
    print(f"{'':27s}" + "".join(f"{c:>18s}" for c in COLUMNS))
    medians = {}
    for way, name in ways.items():
        rates = {c: [n / t[key] for t in times[way]] for c, (key, _) in COLUMNS.items()}
        medians[way] = {c: float(np.median(r)) for c, r in rates.items()}
        print(f"({way}) {name:23s}"[:27].ljust(27) + "".join(f"{medians[way][c]:6.0f} {str([round(x) for x in r]):>11s}"
                                               for c, r in rates.items()))
    pairs = (("onnx", "torch", 1.5),) if args.engines else (("a", "b", 1.8), ("a", "c", 3.0))
    for way, other, target in pairs:
        print(f"ratio ({way})/({other}), target >= {target}x:" + "".join(
            f"  {c} {medians[way][c] / medians[other][c]:.2f}x" for c in COLUMNS))
    if not args.engines:
        imports = {way: np.median([t["imports_s"] for t in times[way]]) for way in ("b", "c")}
        print(f"imports of (b) {imports['b']:.1f} s, (c) {imports['c']:.1f} s (distcls imports ray and torchvision)")
    print("each way wrote one row per image (checked)")
    other = [t["other_cpu_s"] for ts in times.values() for t in ts]
    repeats = sum(t["repeats"] for ts in times.values() for t in ts)
    print(f"noise (a shared machine): runs start once it is idle; {repeats} runs during which other processes "
          f"took > 10% of the CPUs were discarded and redone; other processes used {np.median(other):.1f} CPU-s "
          f"per kept run (median; max {max(other):.1f})")
    raw = {way: [{k: round(float(v), 2) for k, v in t.items()} for t in ts] for way, ts in times.items()}
    print("raw: " + json.dumps(raw))


def main() -> None:
    if len(sys.argv) == 5 and sys.argv[1] in ("_b", "_c"):  # a child process of this benchmark
        way = {"_b": plain_loop, "_c": ray_recipe}[sys.argv[1]]
        imports_s = time.time() - IMPORTS_STARTED
        print(json.dumps({"imports_s": imports_s, **way(*sys.argv[2:])}))
        return
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=5000)
    parser.add_argument("--trials", type=int, default=3)
    parser.add_argument("--size", default="640x480", help="WxH the CIFAR images are upscaled to")
    parser.add_argument("--small", action="store_true", help="keep the original 32x32 JPEGs")
    parser.add_argument("--engines", action="store_true",
                        help="compare `distcls label --engine torch` and `--engine onnx` instead of (a), (b), (c)")
    args = parser.parse_args()
    ways = ENGINE_WAYS if args.engines else WAYS
    size = None if args.small else tuple(int(x) for x in args.size.split("x"))
    with tempfile.TemporaryDirectory(dir="/tmp") as tmp:
        lake = make_lake(Path(tmp), args.images, size)
        lake_text = (f"{args.images} CIFAR-10 train JPEGs, " + ("original 32x32" if size is None else
                     f"upscaled to {size[0]}x{size[1]}, JPEG q90") + f", {_megabytes(lake):.0f} MB on local disk")
        model = make_model(Path(tmp) / "model")
        if "onnx" in ways:
            from distcls.config import ExportConfig
            from distcls.export import export

            export(ExportConfig(model=model))
        times: dict[str, list[dict]] = {way: [] for way in ways}
        for _ in range(args.trials):
            for way in ways:
                times[way].append(trial(way, lake, model, Path(tmp) / "out", args.images))
        check_rows(Path(tmp) / "out", args.images, ways)
        report(args, lake_text, times, ways)


def _megabytes(folder: Path) -> float:
    return sum(f.stat().st_size for f in folder.rglob("*.jpg")) / 2**20


if __name__ == "__main__":
    main()
