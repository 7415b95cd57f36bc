"""Training end to end: multi-node Ray Train over S3, fault tolerance, resume, bad input."""
from __future__ import annotations

import importlib
import json
import logging
import os
import platform
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import psutil
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import ray
import torch
from ray.data._internal.execution.execution_callback import ExecutionCallback
from ray.util.queue import Queue

from distcls import decode_stage, load_model
from distcls.artifact import predict_proba
from distcls.cli import main
from distcls.config import TrainConfig
from distcls.images import decode
from distcls.lake import labelled_images
from distcls.errors import JobError, UsageError
from distcls.models import create_model, schedule
from distcls.decode_stage import PacedScheduling
from distcls.train import (Lookahead, choose_cache, decode_pool, eval_batch_size, fit_batch, one_cycle,
                           param_groups, plan_cpus, stream_window, train, _worker_failure)
from distcls.storage import Store

REPO = Path(__file__).resolve().parents[1]
train_module = importlib.import_module("distcls.train")  # the package's `train` is the function
QUICK = {"epochs": 6, "batch_size": 64, "lr": 0.05, "workers": 2}
LONGER = {**QUICK, "epochs": 7}  # leaves time to kill something mid-run (during epoch 4)


def _history(output: Path) -> list[dict]:
    return [json.loads(line) for line in (output / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("arch, points, peak", [("resnet_small", (0.1, 0.2, 0.0), 20), ("airbench", (0.2, 0.23, 0.07), 23)])
def test_one_cycle_warms_up_then_decays(arch, points, peak) -> None:
    """A triangle from the start up to 1, then down to the end: airbench's ends above 0 (its
    lookahead averages the last steps), the others at 0."""
    assert schedule(arch) == points
    values = [one_cycle(p / 100, *points) for p in range(101)]
    assert int(np.argmax(values)) == peak and max(values) == pytest.approx(1.0)
    assert all(a <= b for a, b in zip(values[:peak], values[1:peak + 1]))
    assert all(a >= b for a, b in zip(values[peak:], values[peak + 1:]))
    assert values[0] == pytest.approx(points[0]) and values[-1] == pytest.approx(points[2])


@pytest.mark.slow
def test_two_workers_on_three_nodes_over_s3(ray_cluster, synthetic_lake, upload_folder, s3_bucket, tmp_path,
                                           monkeypatch) -> None:
    from ray._private import state

    queue_nodes = []

    def placed_queue(*args, **kwargs):
        queue = Queue(*args, **kwargs)
        queue.size()  # the actor is up
        queue_nodes.append(state.actors(queue.actor._actor_id.hex())["Address"]["NodeID"])
        return queue

    monkeypatch.setattr(train_module, "Queue", placed_queue)
    lake = upload_folder(synthetic_lake(30), f"{s3_bucket}/lake")
    output = f"s3://{s3_bucket}/runs/one"
    result = train(TrainConfig(input=lake, output=output, **QUICK))
    # The epoch lines' queue asks for no resources: only a hard affinity keeps it off the worker
    # nodes, which an autoscaler may remove mid-run (its epochs would then reach neither log nor MLflow).
    assert queue_nodes == [ray.get_runtime_context().get_node_id()]

    model, info = load_model(Store(result["model"]))
    assert info.classes == sorted(info.classes) and len(info.classes) == 10
    assert not model.training
    # Loss fell and accuracy is far above chance (10%) on the held-out 10%.
    assert result["val_accuracy"] >= 0.4
    import s3fs

    fs = s3fs.S3FileSystem(endpoint_url=os.environ["AWS_ENDPOINT_URL"])
    history = [json.loads(line) for line in fs.cat(f"{s3_bucket}/runs/one/metrics.jsonl").decode().splitlines()]
    assert [row["epoch"] for row in history] == list(range(1, 7))
    # The recipe's test-time flip after the last epoch, plain forward passes before it.
    assert [row["val_tta"] for row in history] == ["none"] * 5 + ["flip"] and info.tta == "flip"
    assert history[-1]["train_loss"] < history[0]["train_loss"]
    assert fs.exists(f"{s3_bucket}/runs/one/curves.png")
    # The artifact predicts held-out images through the same decode path: mostly right.
    val = pq.read_table(fs.open(f"{s3_bucket}/runs/one/val.parquet")).to_pylist()
    images = np.stack([decode(fs.cat(row["path"].removeprefix("s3://")), info.image_size)[0] for row in val])
    # Whichever epoch is the best (an earlier one was evaluated plainly), the artifact's metrics are
    # measured as it predicts.
    assert info.metrics["val_tta"] == "flip"
    probs = predict_proba(model, info, images)
    predicted = probs.argmax(1).tolist()
    correct = sum(info.classes[p] == row["label"] for p, row in zip(predicted, val))
    assert correct / len(val) == pytest.approx(result["val_accuracy"], abs=1e-6)
    # model.json keeps what the model predicted on the held-out split: label's drift reference.
    shares = np.bincount(predicted, minlength=len(info.classes)) / len(val)
    assert info.validation.images == len(val)
    assert [info.validation.predicted[name] for name in info.classes] == pytest.approx(shares.tolist(), abs=1e-6)
    assert info.validation.mean_top1 == pytest.approx(probs.max(1).values.mean().item(), abs=1e-4)


@pytest.mark.slow
def test_two_workers_and_streaming_reach_the_accuracy_of_one(ray_local, synthetic_lake, tmp_path) -> None:
    """Neither data-parallel training nor streaming may cost accuracy. Each worker trains on the
    rows Ray Data hands it; when those were the lake's rows in listing order (sorted by class), each
    of 2 workers saw half the classes and the artifact's BatchNorm statistics fitted neither half
    (68% against 100% on the demo lake). Streaming hands them the same shuffled rows, in blocks
    whose order changes every epoch, through a local shuffle buffer instead of a cached shard. One
    streamed run with 2 workers against one cached run with 1 (a third run, 2 workers cached, was
    a third of the test's 257 s in CI). The class-sorted split behind the 68% is guarded by
    test_the_training_rows_are_shuffled_before_the_workers_split_them: with today's recipe this
    lake hides it (a review sorted the rows by class: 2 workers still scored 0.97-1.00)."""
    from distcls.evaluate import evaluate
    from distcls.config import EvaluateConfig

    from ray._private import state

    def decoders() -> dict[str, dict]:
        return {k: a for k, a in state.actors().items() if a["ActorClassName"] == "MapWorker(MapBatches(Decoder))"}

    lake = str(synthetic_lake(100))
    # 6 epochs, not 8: both runs scored 0.99 at 6 and at 5 (2026-12-02, a script doing this test's runs).
    epochs, accuracy = 6, {}
    for workers, cache in ((1, "memory"), (2, "none")):
        output = tmp_path / f"workers{workers}-{cache}"
        before = set(decoders())
        result = train(TrainConfig(input=lake, output=str(output), epochs=epochs, batch_size=64, lr=0.05, workers=workers,
                                   cache=cache))
        scores = evaluate(EvaluateConfig(input=str(output / "val.parquet"), model=result["model"]))
        accuracy[workers, cache] = scores["accuracy"]
    # The streamed run's decoders: a pool of at most 2 (0.5 CPU in 0.25 shares) per execution, 2 per
    # epoch (train and val; the stats sample decodes in tasks), none restarted. As tasks, Ray ended their workers whenever
    # they idled a second and started new ones (10 in a 150 s epoch of the photo benchmark).
    streamed = [a for k, a in decoders().items() if k not in before]
    assert 1 <= len(streamed) <= 2 * (2 * epochs + 2) and all(a["NumRestarts"] == 0 for a in streamed), streamed
    # Measured at 1e2f00d, before the rows were shuffled: 1.0 with 1 worker, 0.79 with 2.
    assert accuracy[1, "memory"] >= 0.95, accuracy
    assert accuracy[2, "none"] >= accuracy[1, "memory"] - 0.05, accuracy


@pytest.mark.parametrize("held_out", ["fraction", "val_input"])
def test_the_training_rows_are_shuffled_before_the_workers_split_them(synthetic_lake, tmp_path, held_out) -> None:
    """Ray Data hands each worker whole blocks of consecutive rows; a listing is sorted by class,
    and 2 workers each trained on half the classes (68% held out on the demo lake, 100% with 1)."""
    lake = synthetic_lake(30)
    extra = {"val_input": str(synthetic_lake(3))} if held_out == "val_input" else {}
    train_rows, _, classes, _ = train_module._split(TrainConfig(input=str(lake), output=str(tmp_path / "o"), **extra))
    labels = train_rows["label"].to_numpy()
    assert len(classes) > 2 and sorted(labels) != labels.tolist()
    for half in np.array_split(labels, 2):  # what each of 2 workers would get in listing order
        assert set(half) == set(range(len(classes)))


def _wait_for_epochs(output: Path, count: int, timeout: float = 600) -> None:
    """Rank 0 rewrites metrics.jsonl before each report; a second row means the first epoch's
    checkpoint report (a barrier) has completed. The wait ends as soon as it has; the limit only
    stops a hung run: 240 s ran out under load average 15-25 (the resume test needs ~90 s quiet)."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        if (output / "metrics.jsonl").exists() and len(_history(output)) >= count:
            return
        time.sleep(0.1)
    raise AssertionError(f"training did not reach epoch {count} within {timeout}s")


def _kill_a_worker_after_first_checkpoint(output: Path, killed: list[int]) -> None:
    """Kill a training worker of this test's own Ray (nodes of the multi-node fixture are descendants
    of this process) during epoch 4.
    Rank 0 writes a third metrics row after two reports, so epoch 1's checkpoint is registered."""
    _wait_for_epochs(output, 3)
    for proc in psutil.Process().children(recursive=True):
        try:
            if any("RayTrainWorker" in part for part in proc.cmdline()):
                proc.kill()
                killed.append(proc.pid)
                return
        except psutil.NoSuchProcess:
            continue


@pytest.mark.slow
def test_killed_worker_is_replaced_and_training_resumes(ray_cluster, synthetic_lake, tmp_path) -> None:
    """A streaming run (decoding on the third node's CPU) loses a worker mid-epoch; the rerun below
    covers a cached one."""
    output = tmp_path / "run"
    killed: list[int] = []
    killer = threading.Thread(target=_kill_a_worker_after_first_checkpoint, args=(output, killed))
    killer.start()
    result = train(TrainConfig(input=str(synthetic_lake(30)), output=str(output), max_failures=2, cache="none", **LONGER))
    killer.join()

    assert killed, "no Ray Train worker process was found to kill"
    history = _history(output)
    assert [row["epoch"] for row in history] == list(range(1, LONGER["epochs"] + 1))  # no epoch lost or repeated
    assert history[-1]["restores"] >= 1  # the replacement workers started from a checkpoint
    model, info = load_model(Store(result["model"]))
    best = max(history, key=lambda row: (row["val_accuracy"], row["epoch"]))  # ties: the later epoch
    assert info.model_id == result["model_id"] and info.metrics["epoch"] == best["epoch"]


@pytest.mark.slow
def test_rerunning_a_stopped_run_resumes(synthetic_lake, tmp_path, capsys) -> None:
    """SIGKILL the whole `distcls train` process after its first epoch, then run the same command.
    What the killed process printed is what a default run shows: an epoch line with an ETA per
    epoch on stderr, nothing of Ray's own (its workers' lines are prefixed ``(... pid=N)``)."""
    output = tmp_path / "run"
    argv = ["train", "--input", str(synthetic_lake(30)), "--output", str(output),
            *[f"--{k.replace('_', '-')}={v}" for k, v in LONGER.items()]]
    with open(tmp_path / "stdout", "w") as out, open(tmp_path / "stderr", "w") as err:
        process = subprocess.Popen([sys.executable, "-m", "distcls", *argv], start_new_session=True,
                                   stdout=out, stderr=err)
        _wait_for_epochs(output, 3)
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()
    first = _history(output)
    assert 3 <= len(first) < LONGER["epochs"]
    said = (tmp_path / "stderr").read_text()
    assert (tmp_path / "stdout").read_text() == ""  # killed before its JSON summary
    for epoch in (1, 2):
        assert re.search(rf"^distcls: epoch +{epoch}/7 +train_loss \S+ +val_loss \S+ +val_acc \S+ .* ETA \w+$",
                         said, flags=re.MULTILINE), said
    assert not re.search(r"pid=\d+|Reporting training result|PlacementGroupCleaner|Traceback", said), said

    assert main(argv) == 0
    out, err = capsys.readouterr()
    assert json.loads(out)["epoch"] >= 1  # stdout: the JSON summary alone
    assert "resuming from checkpoint after epoch" in err  # rank 0's message, through the driver
    assert f"taking over the lock of {output} from " in err  # the killed run's, its process gone
    history = _history(output)
    assert [row["epoch"] for row in history] == list(range(1, LONGER["epochs"] + 1))
    assert history[0] == first[0]  # the epoch finished before the kill was kept, not redone
    assert history[-1]["restores"] >= 1


def test_the_artifact_of_an_epoch_evaluated_without_its_tta_says_what_it_predicts(ray_local, synthetic_lake, tmp_path,
                                                                                  capsys) -> None:
    """The best checkpoint may have been evaluated without the artifact's --tta (an epoch before
    the last; here a rerun that changed --tta, deterministically): model.json kept that epoch's
    plain val_accuracy, which evaluate did not reproduce, and its plain validation distribution,
    label's drift reference, for a model that predicts with --tta."""
    output = tmp_path / "run"
    argv = ["train", "--input", str(synthetic_lake(6)), "--output", str(output), "--arch", "simple_cnn",
            "--epochs", "2", "--batch-size", "32", "--workers", "1"]
    assert main([*argv, "--tta", "none"]) == 0
    capsys.readouterr()
    assert main([*argv, "--tta", "flip"]) == 0  # resumes after its last epoch: nothing left to train
    out, err = capsys.readouterr()
    summary = json.loads(out)
    assert "nothing to train: the checkpoint is of epoch 2, --epochs is 2" in err
    # No training image decoded in this attempt: their count is unknown, not 0; the held-out ones
    # were decoded again for the --tta evaluation.
    assert summary["unreadable_images"] == {"train": None, "val": 0}
    assert [row["val_tta"] for row in _history(output)] == ["none", "none"]
    model, info = load_model(Store(str(output / "model")))
    assert info.tta == "flip" and info.metrics["val_tta"] == "flip" and summary["model_id"] == info.model_id

    assert main(["evaluate", "--input", str(output / "val.parquet"), "--model", str(output / "model")]) == 0
    scores = json.loads(capsys.readouterr().out)
    assert scores["accuracy"] == pytest.approx(info.metrics["val_accuracy"], abs=1e-6)
    assert summary["val_accuracy"] == info.metrics["val_accuracy"]
    val = pq.read_table(output / "val.parquet").to_pylist()
    images = np.stack([decode(Path(row["path"]).read_bytes(), info.image_size)[0] for row in val])
    probs = predict_proba(model, info, images)
    shares = np.bincount(probs.argmax(1).numpy(), minlength=len(info.classes)) / len(val)
    assert [info.validation.predicted[name] for name in info.classes] == pytest.approx(shares.tolist(), abs=1e-6)
    assert info.validation.mean_top1 == pytest.approx(probs.max(1).values.mean().item(), abs=1e-4)


def test_resuming_a_run_of_another_arch_is_a_usage_error_naming_it(synthetic_lake, tmp_path, capsys) -> None:
    """A run started with the default --arch of an older distcls (airbench), rerun after the default
    changed: every worker failed to load its checkpoint, restart after restart, and the error said
    that rerunning resumes."""
    import safetensors.torch

    lake = synthetic_lake(12)
    classes = sorted(p.name for p in lake.iterdir() if p.is_dir())
    checkpoint = tmp_path / "run" / "distcls-train" / "checkpoint_2026-12-02_10-00-00.000000"
    checkpoint.mkdir(parents=True)
    safetensors.torch.save_file(create_model("airbench", len(classes)).state_dict(), str(checkpoint / "model.safetensors"))
    argv = ["train", "--input", str(lake), "--output", str(tmp_path / "run")]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"distcls train: error: --output {tmp_path / 'run'} holds checkpoints of run 'distcls-train' "
                          f"that do not fit --arch airbench94 with {len(classes)} classes (") and len(err.splitlines()) == 1
    assert "pass the --arch (and settings) that run was started with" in err
    assert not (tmp_path / "run" / "val.parquet").exists()


@pytest.mark.parametrize("broken", [0.5, 1.0])
def test_unreadable_images_on_one_worker_cost_the_others_no_image(ray_local, synthetic_lake, tmp_path, capsys,
                                                                    broken) -> None:
    """Cached, each worker decodes its own rows (rows[rank::workers]); the broken files may all be
    one worker's. DDP needs as many steps from each, not as many images: the others keep every image
    they decoded, every held-out image that decodes is evaluated, and a worker left without a whole
    batch fails the run at once, naming it, not after its epochs with 'no image was trained on'."""
    lake = tmp_path / "lake"
    shutil.copytree(synthetic_lake(12), lake)
    argv = ["train", "--input", str(lake), "--output", str(tmp_path / "run"), "--arch", "simple_cnn", "--epochs", "2",
            "--batch-size", "16", "--workers", "2", "--cache", "memory", "--max-failures", "0"]
    train_rows, val_rows, _, _ = train_module._split(TrainConfig(input=str(lake), output="unused", workers=2))
    second = train_rows["path"].to_pylist()[1::2]
    for path in second[:int(len(second) * broken)]:
        Path(path).write_bytes(b"not an image")
    first = len(train_rows["path"].to_pylist()[0::2])
    code = main(argv)
    err = capsys.readouterr().err
    if broken == 1.0:  # the check before the run passes: half the training images decode
        assert code == 1 and f"training worker 1 decoded 0 of its {len(second)} training images, fewer than a batch (8)" in err
        assert "epoch   1/2" not in err
        return
    assert code == 0, err
    steps = (len(second) - int(len(second) * broken)) // 8
    assert f"training images by worker [{first}, {len(second) - int(len(second) * broken)}], {steps} steps of 8" in err
    assert [row["train_images"] for row in _history(tmp_path / "run")] == [2 * steps * 8] * 2
    assert [row["val_images"] for row in _history(tmp_path / "run")] == [val_rows.num_rows] * 2


@pytest.mark.parametrize("precision", ["bf16", "fp32"])
def test_a_best_epoch_evaluated_in_bfloat16_is_evaluated_again_as_inference_predicts(ray_local, synthetic_lake,
                                                                                      tmp_path, precision) -> None:
    """Epochs before the last evaluate in the training steps' bfloat16; the artifact's metrics must
    be float32's, as evaluate and label predict: a best checkpoint evaluated in bfloat16 (its row
    says so) is evaluated again, one evaluated in float32 with the artifact's tta is kept as it is."""
    from distcls import crashes, lake

    config = TrainConfig(input=str(synthetic_lake(3)), output=str(tmp_path / "run"), arch="simple_cnn", tta="none")
    rows, classes = lake.labelled_images(Store(config.input))
    model = create_model(config.arch, num_classes=len(classes))
    folder = tmp_path / "checkpoint"
    folder.mkdir()
    import safetensors.torch

    safetensors.torch.save_file(model.state_dict(), str(folder / "model.safetensors"))
    torch.save({"mean": (0.5,) * 3, "std": (0.25,) * 3}, folder / train_module.STATE_FILE)
    metrics = {"epoch": 3, "train_loss": 1.0, "val_loss": 1.0, "val_accuracy": 0.123456, "elapsed_s": 1.0,
               "val_tta": "none", "val_precision": precision}
    info = train_module._save_artifact(config, classes, ray.train.Checkpoint.from_directory(str(folder)), metrics,
                                       rows, crashes.start_registry())
    images = np.stack([decode(Path(path).read_bytes(), config.image_size)[0] for path in rows["path"].to_pylist()])
    predicted = predict_proba(model.eval(), info, images).argmax(1).numpy()
    accuracy = float(np.mean(predicted == rows["label"].to_numpy()))
    assert info.metrics["val_accuracy"] == (pytest.approx(accuracy, abs=1e-6) if precision == "bf16" else 0.123456)
    assert accuracy != 0.123456


def test_decode_cpus_leave_the_workers_some(tmp_path) -> None:
    def plan(total: float, **settings) -> tuple[float, float]:
        return plan_cpus(TrainConfig(input="lake", output="out", workers=2, **settings), total)

    assert plan(2) == (0.75, 0.5)  # this machine: the workers make room for the decode tasks
    assert plan(3) == (1.0, 1.0)  # a spare CPU: decoding takes it, the workers keep theirs
    assert plan(8, decode_cpus=2) == (1.0, 2)
    assert plan(4, decode_cpus=3) == (0.5, 3)
    # An autoscaling cluster still at zero: nothing to take from.
    assert plan_cpus(TrainConfig(input="lake", output="out", workers=2), 0, can_grow=True) == (1.0, 1.0)
    # A fixed one too small for the workers: Ray Train would wait for ever.
    with pytest.raises(UsageError, match="--workers 3 x --cpus-per-worker 1 need 3 CPUs; the Ray cluster has 2"):
        plan_cpus(TrainConfig(input="lake", output="out", workers=3), 2)
    for total, decode_cpus, message in ((2, 3, "more than the 2 CPUs"), (2, 2, "leaves the 2 training workers no CPUs")):
        with pytest.raises(UsageError, match=message):
            plan(total, decode_cpus=decode_cpus)
    # An autoscaler may add CPUs: no --decode-cpus is too many for a cluster that can grow.
    assert plan_cpus(TrainConfig(input="lake", output="out", workers=2, decode_cpus=3), 0, can_grow=True) == (1.0, 3)


def test_a_streamed_epoch_holds_at_most_the_stream_window_ahead() -> None:
    """Ray Train gets it as the datasets' object store limit: 256 MiB, or two blocks per worker."""
    config = TrainConfig(input="lake", output="out", image_size=128, workers=2)
    assert stream_window(config) == 256 * 2**20  # blocks of 256 x 128^2 x 3 bytes: 12 MiB each
    assert stream_window(config.model_copy(update={"image_size": 512})) == 4 * 256 * 512 * 512 * 3


def test_the_executor_loop_waits_longest_when_it_has_nothing_to_wait_for(monkeypatch) -> None:
    """Ray Data's loop spins while the stream window is full: no task running, or a finished one
    whose output the budget does not let it read. Steps that blocked on a running task are not slowed."""
    clock, slept = [100.0], []
    # decode_stage's `time` only: the time module's own functions are every thread's.
    monkeypatch.setattr(decode_stage, "time", SimpleNamespace(
        perf_counter=lambda: clock[0], sleep=lambda s: (slept.append(round(s, 6)), clock.__setitem__(0, clock[0] + s))))
    read = SimpleNamespace(_in_task_output_backpressure=False, get_active_tasks=lambda: [])
    decode = SimpleNamespace(_in_task_output_backpressure=False, get_active_tasks=lambda: ["task"])
    executor = SimpleNamespace(_topology=[read, decode])  # a dict of operators in Ray, iterated the same way
    pacing = PacedScheduling()
    clock[0] += 0.05  # a step that blocked on its running task
    pacing.on_execution_step(executor)
    clock[0] += 0.001  # a step whose task had finished
    pacing.on_execution_step(executor)
    decode._in_task_output_backpressure = True  # a finished task it may not read
    clock[0] += 0.001
    pacing.on_execution_step(executor)
    decode._in_task_output_backpressure, decode.get_active_tasks = False, lambda: []  # nothing running
    clock[0] += 0.001
    pacing.on_execution_step(executor)
    assert slept == [round(decode_stage.STEP_S - 0.001, 6)] + 2 * [round(decode_stage.IDLE_STEP_S - 0.001, 6)]


def test_pacing_sees_a_full_stream_window_in_the_installed_ray(ray_local) -> None:
    """The names PacedScheduling reads exist in this Ray and show both states of a full window to a
    slow consumer: a finished task whose output may not be read, and no task running at all."""
    pauses, nothing_running, started = [], [], []

    class Counting(PacedScheduling):
        def on_execution_step(self, executor: Any) -> None:
            if any(op._in_task_output_backpressure for op in executor._topology):
                pauses.append(self.idle(executor))
            # The spin a full window causes most: the blocks decoded, no task left to wait on.
            running = any(op.get_active_tasks() for op in executor._topology)
            if any(started) and not running:
                nothing_running.append(self.idle(executor))
            started.append(running)

    dataset = ray.data.range(64, override_num_blocks=64).map_batches(
        lambda b: {"x": np.zeros((len(b["id"]), 2**20), dtype=np.uint8)}, batch_size=None)
    dataset.context.custom_execution_callback_classes = [Counting]
    dataset.context.execution_options.resource_limits = ray.data.ExecutionResources(object_store_memory=4 * 2**20)
    for _ in dataset.iter_batches(batch_size=1, prefetch_batches=0):
        time.sleep(0.05)
    assert pauses and all(pauses)
    assert any(started) and nothing_running and all(nothing_running)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="thread priorities are Linux's")
def test_training_decodes_at_nice_19_and_reports_its_errors(monkeypatch) -> None:
    seen = []

    def decode(batch, storage_config, size, crash_registry=None, scope=""):
        seen.append(os.getpriority(os.PRIO_PROCESS, threading.get_native_id()))
        if size == 13:
            raise OSError("disk gone")
        return {"image": batch["path"], "label": batch["label"]}

    monkeypatch.setattr(decode_stage, "decode_rows", decode)
    own = os.getpriority(os.PRIO_PROCESS, threading.get_native_id())
    batch = {"path": np.array(["a", "b"]), "label": np.array([1, 2])}
    assert decode_stage.decode_yielding(batch, None, 16) == {"image": batch["path"], "label": batch["label"]}
    assert seen == [19]
    assert os.getpriority(os.PRIO_PROCESS, threading.get_native_id()) == own  # the caller keeps its own
    with pytest.raises(OSError, match="disk gone"):
        decode_stage.decode_yielding(batch, None, 13)

    def refuse(*args):
        raise PermissionError("setpriority refused")

    monkeypatch.setattr(decode_stage.os, "setpriority", refuse)  # a sandbox: decoding goes on
    assert decode_stage.decode_yielding(batch, None, 16)["label"].tolist() == [1, 2]


def test_every_training_dataset_is_paced_where_it_executes_and_keeps_the_drivers_callbacks(
        ray_local, synthetic_lake, monkeypatch) -> None:
    """The split datasets execute in Ray Train's SplitCoordinator, "stats" in each worker: both get
    the context the dataset carries there. The driver's own context is left as it was, so the
    datasets label creates later are not paced."""
    class DriversCallback(ExecutionCallback):
        """One a notebook set on its DataContext before training (a progress display, say)."""

    driver = ray.data.DataContext.get_current()
    monkeypatch.setattr(driver, "custom_execution_callback_classes", [DriversCallback])
    root = synthetic_lake(2)
    config = TrainConfig(input=str(root), output="unused", workers=2)
    rows, _ = labelled_images(Store(str(root), config.storage()))
    datasets = {name: train_module._dataset(rows, config, 0.5, name, None) for name in ("train", "stats")}
    shards = ray.train.DataConfig(datasets_to_split=["train"]).configure(
        datasets, world_size=2, worker_handles=None, worker_node_ids=None)
    iterators = {"train": shards[1]["train"],  # its context comes from its SplitCoordinator actor
                 "stats": ray.cloudpickle.loads(ray.cloudpickle.dumps(shards[1]["stats"]))}  # as a worker gets it
    for name, iterator in iterators.items():
        classes = iterator.get_context().custom_execution_callback_classes
        assert [cls.__name__ for cls in classes] == ["DriversCallback", "PacedScheduling"], name
    assert driver.custom_execution_callback_classes == [DriversCallback]


@pytest.mark.parametrize("workers, cpus_per_worker, decode_cpus, blocks, expected", [
    (2, 1, 0.5, 36, (0.25, 2)),     # this machine: the workers give up 0.5 CPU between them
    (4, 16, 0.5, 36, (0.25, 2)),    # not 64 actors of 1/128 CPU, each importing torch every execution
    (2, 1, 0.9, 36, (0.3, 3)),      # 0.3 each fits in 0.9 however Ray rounds
    (2, 1, 0.5, 1, (0.5, 1)),       # a 1-block held-out split
    (2, 1, 62.0, 400, (1.0, 62)),   # a 64-CPU node
    (2, 1, 62.0, 4, (1.0, 4)),      # never more actors than blocks: each starts, used or not
    (2, 1, 2.5, 36, (1.0, 2)),
])
def test_the_decode_pool_fits_its_cpus_and_its_blocks(workers, cpus_per_worker, decode_cpus, blocks, expected) -> None:
    config = TrainConfig(input="lake", output="out", workers=workers, cpus_per_worker=cpus_per_worker)
    actor_cpus, actors = decode_pool(config, decode_cpus, blocks)
    assert (actor_cpus, actors) == expected and actors * round(actor_cpus, 4) <= decode_cpus


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="mallopt is glibc's")
def test_training_workers_keep_freed_activations_instead_of_faulting_them_in_again() -> None:
    # What a training step does, in a thread as Ray Train runs the loop: allocate and free
    # activations of tens of MB (under the 64 MB a thread's arena can keep). Counted in the
    # thread's page faults, not seconds (what it saves is BENCHMARKS.md's).
    script = """
import resource, threading, torch
from distcls.runtime import keep_freed_memory
def faults():
    before = resource.getrusage(resource.RUSAGE_THREAD).ru_minflt
    for _ in range(5):  # two activations alive at once, as in a step
        first = torch.empty(40 << 20, dtype=torch.uint8).fill_(1)
        torch.empty(20 << 20, dtype=torch.uint8).fill_(1)
        del first
    return resource.getrusage(resource.RUSAGE_THREAD).ru_minflt - before
def step():
    default = faults()
    took = keep_freed_memory()
    faults()  # the first allocation after it is still faulted in once
    print(default, int(took), faults())
thread = threading.Thread(target=step)
thread.start()
thread.join()
"""
    default, took, kept = map(int, subprocess.run([sys.executable, "-c", script], check=True, capture_output=True,
                                                  text=True, cwd=REPO).stdout.split())
    if default < 5_000:  # 76,800 4-KB pages were allocated; here ~25,600 of them fault
        pytest.skip(f"this environment's allocator already keeps or huge-pages them ({default} faults before)")
    assert took == 1 and kept < default / 20


def test_the_held_out_batch_is_bounded_by_its_pixels() -> None:
    assert eval_batch_size(32) == 1000
    assert eval_batch_size(128) == 256
    assert eval_batch_size(1024) == 4


def test_auto_caches_a_lake_that_fits_a_quarter_of_a_node(caplog) -> None:
    caplog.set_level(logging.INFO, logger="distcls")
    config = TrainConfig(input="lake", output="out", image_size=128)
    decoded = 10_000 * 128 * 128 * 3
    assert choose_cache(config, 10_000, node_memory=4 * decoded) == "memory"
    assert choose_cache(config, 10_000, node_memory=4 * decoded - 1) == "none"
    assert choose_cache(config, 10_000, node_memory=0) == "none"
    said = [record.getMessage() for record in caplog.records]
    assert said[0].startswith("cache: memory (decoded lake 0.46 GiB <=") and said[1].startswith("cache: none")
    assert choose_cache(config.model_copy(update={"cache": "none"}), 10, node_memory=2**40) == "none"


def test_an_unknown_cache_is_a_usage_error(tmp_path, capsys) -> None:
    assert main(["train", "--input", str(tmp_path), "--output", str(tmp_path / "out"), "--cache", "disk"]) == 2
    err = capsys.readouterr().err.strip()
    assert "--cache" in err and "'disk'" in err and len(err.splitlines()) == 1
    assert not (tmp_path / "out").exists()


def test_more_decode_cpus_than_the_cluster_has_is_a_usage_error(ray_local, synthetic_lake, tmp_path, capsys) -> None:
    output = tmp_path / "out"
    argv = ["train", "--input", str(synthetic_lake(30)), "--output", str(output), "--decode-cpus", "3"]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.endswith("--decode-cpus 3 is more than the 2 CPUs of the Ray cluster") and len(err.splitlines()) == 1
    assert not output.exists()  # checked before the held-out manifest is written


def test_more_workers_than_a_fixed_cluster_holds_is_a_usage_error_not_a_hang(ray_local, synthetic_lake, tmp_path,
                                                                            capsys) -> None:
    output = tmp_path / "out"
    assert main(["train", "--input", str(synthetic_lake(30)), "--output", str(output), "--workers", "3"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.endswith("--workers 3 x --cpus-per-worker 1 need 3 CPUs; the Ray cluster has 2 and no autoscaler "
                        "to add more") and len(err.splitlines()) == 1
    assert not output.exists()


@pytest.mark.parametrize("make_lake, message", [
    (lambda root: root.mkdir(), "no labelled images"),
    (lambda root: (root / "cat").mkdir(parents=True) or _write_jpegs(root / "cat", 3), "only one class"),
])
def test_bad_data_is_a_clear_usage_error(tmp_path, capsys, make_lake, message) -> None:
    root = tmp_path / "lake"
    make_lake(root)
    assert main(["train", "--input", str(root), "--output", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and str(root) in err and len(err.splitlines()) == 1


@pytest.mark.parametrize("fraction, message", [
    # One image of each class held out (round(0.6), round(0.9)): two, for three workers.
    ("0.3", "--val-fraction 0.3 holds out 2 images, fewer than --workers 3: the held-out images are split "
            "equally, so no worker would evaluate any"),
    # Four held out (round(1.6), round(2.4)): one left to train on.
    ("0.8", "--input {root} has 1 images to train on (--val-fraction 0.8 holds out 4), fewer than --workers 3: they are "
            "split equally, so no worker would train on any"),
])
def test_fewer_images_in_a_split_than_workers_is_a_usage_error(tmp_path, capsys, fraction, message) -> None:
    """Ray Data splits the training and held-out images equally among the workers, dropping the
    remainder: with fewer images than workers each worker would train on, or evaluate, none."""
    root = tmp_path / "lake"
    for name, count in (("cat", 2), ("dog", 3)):
        (root / name).mkdir(parents=True)
        _write_jpegs(root / name, count)
    output = tmp_path / "out"
    assert main(["train", "--input", str(root), "--output", str(output), "--workers", "3", "--val-fraction", fraction]) == 2
    err = capsys.readouterr().err.strip()
    assert err.endswith(message.format(root=root)) and len(err.splitlines()) == 1
    assert not output.exists()


def test_a_split_too_small_names_the_labels_file_that_adds_images_too(tmp_path, capsys) -> None:
    """With --labels, the training images are --input's and the manifest's: the error names both."""
    root = tmp_path / "lake"
    for name, count in (("cat", 2), ("dog", 3)):
        (root / name).mkdir(parents=True)
        _write_jpegs(root / name, count)
    manifest = tmp_path / "labels.csv"
    manifest.write_text(f"path,label\n{root / 'cat' / '0.jpg'},dog\n")
    output = tmp_path / "out"
    code = main(["train", "--input", str(root), "--output", str(output), "--workers", "3", "--val-fraction", "0.8",
                 "--labels", str(manifest)])
    last = capsys.readouterr().err.strip().splitlines()[-1]  # after the line on what --labels changed
    assert code == 2 and last.startswith("distcls train: error: ")
    assert f"--input {root} (with --labels {manifest}) has 1 images to train on" in last
    assert not output.exists()


def test_a_failed_worker_is_named_with_its_error_in_one_line() -> None:
    """Ray Train's WorkerGroupError carries every worker's traceback in its message, and wraps each
    worker's exception in one whose str is that traceback: the user gets the rank to blame, the
    exception it raised (a distcls error as it is) and what a rerun does."""
    from ray.train.v2._internal.exceptions import UserExceptionWithTraceback, WorkerHealthCheckFailedError

    def failed(failures: dict) -> str:
        return str(_worker_failure(ray.train.WorkerGroupError("Training failed due to worker errors", failures), config))

    config = TrainConfig(input="/lake", output="/runs/a", name="nightly")
    rerun = ("; rerunning it with the same --output (/runs/a) and --name (nightly) resumes after the last epoch Ray "
             "Train recorded (it then says which), or starts over")
    traceback = "Traceback (most recent call last):\n  File x\n{}: {}\n"
    assert failed({
        1: UserExceptionWithTraceback(RuntimeError("CUDA out of memory"), traceback.format("RuntimeError", "CUDA")),
        0: UserExceptionWithTraceback(OSError(28, "No space left on device"), traceback.format("OSError", "[Errno 28]")),
    }) == "training worker 0 failed: OSError: [Errno 28] No space left on device" + rerun
    # Rank 1's process died; rank 0's all-reduce then failed: rank 1 is blamed, by Ray's last line.
    assert failed({
        0: UserExceptionWithTraceback(RuntimeError("[gloo/pair.cc:534] Connection closed by peer"), ""),
        1: WorkerHealthCheckFailedError("A worker health check failed.\nWorker info: Worker(\n  pid=16332,\n)",
                                        RuntimeError("The actor is dead because its worker process has died. Worker "
                                                     "exit type: SYSTEM_ERROR. Some common causes include: (1) the "
                                                     "process was killed by the OOM killer")),
    }) == ("training worker 1 failed: WorkerHealthCheckFailedError: The actor is dead because its worker process has "
           "died. Worker exit type: SYSTEM_ERROR." + rerun)
    own = {0: UserExceptionWithTraceback(JobError("s3://lake/x.jpg: the store cannot be reached (after retries)"), "")}
    assert failed(own) == "training worker 0: s3://lake/x.jpg: the store cannot be reached (after retries)" + rerun
    assert failed({1: UserExceptionWithTraceback(RuntimeError("x" * 400), "")}).startswith(
        f"training worker 1 failed: RuntimeError: {'x' * 299}…;")
    bare = str(_worker_failure(ray.train.WorkerGroupError("worker group failed\n\nstarting workers timed out", {}),
                               config))
    assert bare == "training failed: starting workers timed out" + rerun


def test_ray_train_v1_is_refused_before_anything_runs(synthetic_lake, tmp_path, capsys, monkeypatch) -> None:
    """RAY_TRAIN_V2_ENABLED=0 gives Ray Train v1, which returns failures instead of raising them."""
    monkeypatch.setattr(train_module, "is_v2_enabled", lambda: False)
    output = tmp_path / "out"
    assert main(["train", "--input", str(synthetic_lake(2)), "--output", str(output)]) == 2
    assert capsys.readouterr().err.strip() == ("distcls train: error: RAY_TRAIN_V2_ENABLED is 0: distcls trains with "
                                               "Ray Train v2, Ray 2.60's default; unset it")
    assert not output.exists()


def test_a_distcls_error_of_a_decode_step_is_found_inside_rays_wrappers() -> None:
    """A decode step's JobError (a store down for good) reaches the loop as Ray Data's
    UserCodeException inside a RayTaskError inside another (the split coordinator's), and the
    exception chain does not survive pickling: only the traceback text still names the JobError."""
    import traceback

    from ray import cloudpickle
    from ray.exceptions import RayTaskError, UserCodeException
    from ray.train.v2._internal.exceptions import UserExceptionWithTraceback

    try:
        try:
            raise JobError("s3://lake/x.jpg: the store cannot be reached (after retries)")
        except JobError as error:
            raise UserCodeException("UDF failed to process a data block.") from error
    except UserCodeException as exc:
        code, text = exc, traceback.format_exc()
    inner = RayTaskError("ray::MapBatches(decode_yielding)", text, code).as_instanceof_cause()
    try:
        raise inner
    except RayTaskError:
        text = traceback.format_exc()
    outer = RayTaskError("SplitCoordinator.get", text, inner).as_instanceof_cause()
    sent = cloudpickle.loads(cloudpickle.dumps(UserExceptionWithTraceback(outer, "Traceback ...\n" + str(outer))))
    assert sent._base_exc.cause.cause.__cause__ is None  # the chain is gone, as when Ray sends it
    message = str(_worker_failure(ray.train.WorkerGroupError("failed", {0: sent}), TrainConfig(input="/l", output="/o")))
    assert message.startswith("training worker 0: s3://lake/x.jpg: the store cannot be reached (after retries); "), message


def test_held_out_images_none_of_which_decode_fail_the_run_and_save_no_model(ray_local, synthetic_lake, tmp_path,
                                                                             capsys, monkeypatch) -> None:
    """Listed, so past the count, but unreadable: refused before anything is written, naming one. Had
    the driver found them readable (files that break during the run), every worker evaluates none:
    the run fails saving no artifact and says how a rerun gets out (it would resume the same state)."""
    held = tmp_path / "held"
    for name in ("circle", "square"):
        (held / name).mkdir(parents=True)
        (held / name / "0.jpg").write_bytes(b"not a jpeg")
    output = tmp_path / "out"
    argv = ["train", "--input", str(synthetic_lake(4)), "--val-input", str(held), "--output", str(output),
            "--arch", "simple_cnn", "--epochs", "1", "--workers", "2", "--batch-size", "8"]
    assert main(argv) == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        f"distcls train: error: --val-input {held}: 0 of its 2 held-out images decode, fewer than --workers 2 "
        f"(first failure: {held}/circle/0.jpg: not an image (unrecognised format))")
    assert not output.exists()

    monkeypatch.setattr(decode_stage, "count_decodable", lambda paths, config, registry, enough: (enough, None, None))
    code = main(argv)
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 1 and err[-1].endswith(f"no image was evaluated: the run's decode tasks could read too few of them "
                                          f"(see the warning above); no artifact was saved, and a rerun "
                                          f"into --output {output} resumes this run: give another --output or --name")
    assert (f"distcls: warning: 2 of the 2 held-out images failed to decode at least once and were left out (first: "
            f"{held}/circle/0.jpg: not an image (unrecognised format); the decode workers' logs name each)") in err
    assert not (output / "model").exists()


def test_training_images_none_of_which_decode_are_a_usage_error(ray_local, synthetic_lake, tmp_path, capsys) -> None:
    """They trained nothing and saved a model of its initial weights, with exit 0."""
    lake = tmp_path / "lake"
    shutil.copytree(synthetic_lake(1), lake)
    for path in lake.rglob("*.jpg"):
        path.write_bytes(b"\xff\xd8 cut short")
    assert main(["train", "--input", str(lake), "--val-input", str(synthetic_lake(1)), "--output", str(tmp_path / "out"),
                 "--workers", "1"]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith(f"distcls train: error: --input {lake}: 0 of its {len(list(lake.rglob('*.jpg')))} training "
                          f"images decode, fewer than a batch for each worker needs (1 x 2) (first failure: {lake}/"), err
    assert not (tmp_path / "out").exists()


def test_a_second_run_into_an_output_in_use_is_a_usage_error_that_writes_nothing(ray_local, synthetic_lake,
                                                                                 tmp_path, capsys) -> None:
    """Two runs at once into one --output would write the same checkpoints, metrics.jsonl and model/."""
    from distcls.dataset import Dataset

    output = tmp_path / "out"
    with Dataset(Store(str(output))).lock():  # a live run of this process holds it
        code = main(["train", "--input", str(synthetic_lake(6)), "--output", str(output), "--workers", "1",
                     "--epochs", "1"])
        assert sorted(p.name for p in output.iterdir()) == ["_LOCK"]  # no val.parquet, no Ray Train folder
    assert code == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith(f"distcls train: error: output {output} is in use by ") and f"pid {os.getpid()}" in err, err


def test_a_run_whose_output_another_run_took_over_stops_at_the_next_epoch(ray_local, synthetic_lake, tmp_path,
                                                                          capsys) -> None:
    """Another run takes --output's lock over (its lease had lapsed, say): rank 0 sees it before the
    next epoch writes anything, and the run fails without an artifact, the new holder's lock left."""
    output = tmp_path / "run"
    epochs = 8

    def take_over() -> None:
        deadline = time.time() + 600
        while time.time() < deadline and not (output / "metrics.jsonl").exists():
            time.sleep(0.05)
        body = {"host": "elsewhere", "pid": 1, "run_id": "theirs", "token": "theirs", "expires": time.time() + 600,
                "expires_at": "later"}
        (output / "_LOCK").write_text(json.dumps(body))

    thread = threading.Thread(target=take_over)
    thread.start()
    code = main(["train", "--input", str(synthetic_lake(6)), "--output", str(output), "--arch", "simple_cnn",
                 "--epochs", str(epochs), "--batch-size", "16", "--workers", "1", "--tta", "none"])
    thread.join()
    err = capsys.readouterr().err
    assert code == 1 and f"another run holds --output {output} now, or its lock was removed; stopping" in err, err
    assert err.strip().splitlines()[-1] == (
        f"distcls train: failed: lost the lock of {output} to run theirs on host elsewhere (pid 1) while running (this "
        f"run's lease ran out); training stopped and saved no artifact"), err
    assert len(_history(output)) < epochs and not (output / "model").exists()
    assert json.loads((output / "_LOCK").read_text())["token"] == "theirs"


def test_a_run_whose_last_checkpoint_is_before_its_last_epoch_saves_no_artifact() -> None:
    """The workers stop early only for the lock; the driver decides from the checkpoints, since
    rank 0's message may be lost and the driver's own read of the lock may still show its token."""
    config = TrainConfig(input="lake", output="/runs/one", epochs=8)
    for metrics, reached in (({"epoch": 3}, 3), ({}, 0), (None, 0)):
        with pytest.raises(JobError, match=rf"training stopped after epoch {reached} of 8: "
                                           "rank 0 found the lock of --output /runs/one held by another run or "
                                           "removed; no artifact was saved"):
            train_module._refuse_unfinished(metrics, config)
    train_module._refuse_unfinished({"epoch": 8}, config)  # finished, or resumed after its last epoch
    train_module._refuse_unfinished({"epoch": 9}, config)  # a rerun with fewer --epochs


def test_an_output_on_a_store_without_conditional_writes_is_trained_into_unlocked(caplog) -> None:
    """The lock's conditional writes are S3's; a gs:// output trained before the lock existed."""
    caplog.set_level(logging.WARNING, logger="distcls")
    with train_module._output_lock(TrainConfig(input="lake", output="gs://bucket/runs/one")) as lock:
        assert lock is None
    assert "--output gs://bucket/runs/one: no lock against a second run into it" in caplog.text


def test_fewer_decodable_images_than_a_batch_per_worker_is_refused_before_the_run(ray_local, synthetic_lake, tmp_path,
                                                                                    capsys) -> None:
    """Workers train whole batches only: two images that decode passed a check for --workers 2, and
    every epoch then trained none, failing after the last one (and on every rerun)."""
    lake = tmp_path / "lake"
    shutil.copytree(synthetic_lake(8), lake)
    for path in sorted(lake.rglob("*.jpg"))[2:]:
        path.write_bytes(b"not a jpeg")
    output = tmp_path / "out"
    code = main(["train", "--input", str(lake), "--val-input", str(synthetic_lake(2)), "--output", str(output),
                 "--arch", "simple_cnn", "--epochs", "2", "--workers", "2", "--batch-size", "8"])
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert code == 2 and err.startswith(f"distcls train: error: --input {lake}: 2 of its 80 training images decode, "
                                        "fewer than a batch for each worker needs (2 x 4) (first failure: "), err
    assert not output.exists()


def test_an_error_in_a_check_task_is_one_line(ray_local, synthetic_lake, tmp_path, capsys, monkeypatch) -> None:
    """Ray's error for a task is its whole traceback."""
    def gives_up(paths, config, registry, enough):
        from distcls.errors import JobError
        raise JobError("a batch of 16 images from x keeps killing its worker")

    monkeypatch.setattr(decode_stage, "count_decodable", gives_up)
    code = main(["train", "--input", str(synthetic_lake(8)), "--output", str(tmp_path / "out"),
                 "--arch", "simple_cnn", "--workers", "1"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 1 and err[-1] == "distcls train: failed: a batch of 16 images from x keeps killing its worker", err
    assert not any("Traceback" in line or "ray::" in line for line in err)


def test_the_check_before_the_run_stops_at_a_block_the_store_refuses(ray_local, synthetic_lake, monkeypatch) -> None:
    """Every read fails for a passing reason (a 403, a throttled store): the check read the whole split,
    each file 3 times with backoffs (hours on a large lake), then called the files undecodable. It
    stops after one block and says the store could not be read (a JobError in train)."""
    from distcls import crashes, images

    reads: list[str] = []

    def refused(uri, fs, path, limit):
        reads.append(uri)
        raise images.ImageError(f"{uri}: permission denied", "transient")

    monkeypatch.setattr(images, "_read_local", refused)
    monkeypatch.setattr(images, "_READ_BACKOFF_S", 0.0)
    paths = sorted(str(p) for p in synthetic_lake(4).rglob("*.jpg"))
    config = TrainConfig(input="lake", output="out", workers=1)
    decoded, failure, store_failure = decode_stage.count_decodable(pa.chunked_array([paths]), config,
                                                                   crashes.start_registry(), 1)
    assert decoded == 0 and failure == store_failure == f"{paths[0]}: permission denied"
    assert len(reads) == 3 * decode_stage.CHECK_IMAGES < 3 * len(paths)


def test_missing_data_is_a_clear_usage_error(tmp_path, capsys) -> None:
    missing = tmp_path / "nowhere"
    assert main(["train", "--input", str(missing), "--output", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip()
    assert str(missing) in err and "not found" in err


def test_the_first_unreadable_image_is_named_on_one_line() -> None:
    assert train_module._printable("lake/a\nb.jpg: not an image") == "lake/a\\nb.jpg: not an image"
    assert len(train_module._printable("s3://b/" + "k" * 5000)) == 300


def test_unreadable_images_are_skipped_not_fatal(tmp_path) -> None:
    from distcls.config import StorageConfig

    _write_jpegs(tmp_path, 2)
    (tmp_path / "broken.jpg").write_bytes(b"not a jpeg")
    paths = np.array(sorted(str(p) for p in tmp_path.glob("*.jpg")))
    batch = decode_stage.decode_rows({"path": paths, "label": np.array([0, 1, 2])}, StorageConfig(), 16)
    assert batch["image"].shape == (2, 16, 16, 3)
    assert batch["label"].tolist() == [0, 1]  # "broken.jpg" sorts last and is dropped


def _write_jpegs(folder: Path, count: int) -> None:
    from PIL import Image

    for i in range(count):
        Image.new("RGB", (20, 20), (i * 40, 0, 0)).save(folder / f"{i}.jpg")


def test_a_diverged_training_fails_naming_it_and_saves_no_model(ray_local, synthetic_lake, tmp_path: Path,
                                                                 capsys: pytest.CaptureFixture) -> None:
    """--lr 1e30: NaN losses. It failed as 'ValidationError: 1 validation error for ModelInfo'."""
    output = tmp_path / "run"
    code = main(["train", "--input", str(synthetic_lake(6)), "--output", str(output), "--arch", "simple_cnn",
                 "--epochs", "1", "--batch-size", "32", "--workers", "1", "--lr", "1e30"])
    captured = capsys.readouterr()
    assert code == 1 and captured.out == ""
    last = captured.err.strip().splitlines()[-1]
    assert last.startswith("distcls train: failed: training diverged: ") and "val_loss nan" in last and "--lr" in last
    assert not (output / "model" / "model.json").exists()


def test_a_lake_of_one_colour_fails_saying_so_not_lower_lr(ray_local, tmp_path: Path,
                                                           capsys: pytest.CaptureFixture) -> None:
    """All-black images diverge at any --lr (airbench: gradients ~1e24 at the first step); the
    failure said 'lower --lr', which cannot help."""
    from PIL import Image

    for name in ("a", "b"):
        (tmp_path / "lake" / name).mkdir(parents=True)
        for i in range(8):
            Image.new("RGB", (32, 32)).save(tmp_path / "lake" / name / f"{i}.png")
    output = tmp_path / "run"
    code = main(["train", "--input", str(tmp_path / "lake"), "--output", str(output), "--epochs", "1",
                 "--workers", "1", "--lr", "0.001", "--val-fraction", "0.25"])
    captured = capsys.readouterr()
    last = captured.err.strip().splitlines()[-1]
    assert code == 1 and captured.out == "" and not (output / "model").exists()
    assert last.startswith("distcls train: failed: training diverged: ") and "all one colour" in last, last
    assert "--lr" not in last


def test_an_image_size_too_small_for_the_arch_is_a_usage_error(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """airbench94 (the default) at --image-size 8, which config allows: its last pooling leaves 0x0
    pixels, and every worker failed at its first step, restart after restart."""
    code = main(["train", "--input", str(tmp_path / "lake"), "--output", str(tmp_path / "run"), "--image-size", "8"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and err.startswith("distcls train: error: --image-size 8 is too small for --arch airbench94 (")
    assert len(err.splitlines()) == 1 and not (tmp_path / "run").exists()


def test_a_relative_output_gets_every_file_of_the_run(ray_local, synthetic_lake, tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture) -> None:
    """--output run (relative): rank 0 wrote metrics.jsonl into its Ray working directory and the
    driver failed reading <output>/metrics.jsonl (exit 2) after training and saving the model; a
    relative --init-weights is read by the workers, from the same other directory."""
    from distcls.synthetic import CLASSES

    monkeypatch.chdir(tmp_path)
    torch.save(create_model("simple_cnn", num_classes=len(CLASSES)).state_dict(), tmp_path / "init.pth")
    code = main(["train", "--input", str(synthetic_lake(6)), "--output", "run", "--arch", "simple_cnn",
                 "--epochs", "1", "--batch-size", "32", "--workers", "1", "--init-weights", "init.pth"])
    summary = json.loads(capsys.readouterr().out)
    assert code == 0 and summary["model"] == str(tmp_path / "run" / "model")
    assert [json.loads(line)["epoch"] for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()] == [1]


def test_weights_decay_biases_and_batchnorm_do_not_except_airbenchs_whose_shifts_learn_faster() -> None:
    config = TrainConfig(input="lake", output="out", weight_decay=0.01)
    model = create_model("airbench", num_classes=10)
    groups = param_groups(model, config)
    names = {id(p): n for n, p in model.named_parameters()}
    by_name = {names[id(p)]: (g["weight_decay"], g["lr_scale"]) for g in groups for p in g["params"]}
    assert sorted(by_name) == sorted(names.values())  # every parameter once
    assert by_name["head.weight"] == by_name["body.1.weight"] == (0.01, 1.0)
    # airbench decays every parameter by the same amount per step: lr x decay is the weights'.
    assert by_name["whiten.bias"] == (0.01, 1.0)
    assert by_name["body.3.bias"] == (0.01 / 64, 64.0)  # a _BatchNorm shift
    resnet = create_model("resnet_small", num_classes=10)
    assert {(g["weight_decay"], g["lr_scale"]) for g in param_groups(resnet, config)} == {(0.01, 1.0), (0.0, 1.0)}


def test_the_whitening_bias_trains_three_epochs_and_pretrained_layers_their_frozen_ones() -> None:
    model = create_model("airbench", num_classes=10)
    config = TrainConfig(input="lake", output="out", init_weights="w.safetensors", freeze_epochs=2)
    state = {"pretrained": ["body.1.weight"]}
    assert [sorted(train_module._frozen(model, state, config, epoch)) for epoch in range(5)] == [
        ["body.1.weight"], ["body.1.weight"], [], ["whiten.bias"], ["whiten.bias"]]
    assert train_module._frozen(create_model("resnet_small", num_classes=10), {"pretrained": []}, config, 9) == set()


def test_a_batch_the_lake_cannot_fill_is_made_smaller(caplog) -> None:
    caplog.set_level(logging.WARNING, logger="distcls")
    config = TrainConfig(input="lake", output="out", workers=2)  # the default batch, 1024
    assert fit_batch(config, 45_000) is config
    small = fit_batch(config, 270)
    assert small.batch_size == 66 and small.batch_size % 2 == 0  # 270 // 4 steps, a multiple of the workers
    assert "--batch-size 1024 is more than 270 training images fill 4 times an epoch: using 66" in caplog.text
    assert fit_batch(config, 3).batch_size == 2  # one image per worker, at least


def test_lookahead_follows_early_pulls_back_late_and_ends_on_the_average() -> None:
    model = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.BatchNorm1d(2))
    lookahead = Lookahead(model)
    start = model[0].weight.detach().clone()
    with torch.no_grad():
        model[0].weight.add_(1.0)
    lookahead.update(0.0)  # early: the average keeps nothing of itself, the weights stay
    assert torch.equal(model[0].weight, start + 1) and torch.equal(lookahead.slow["0.weight"], start + 1)
    with torch.no_grad():
        model[0].weight.add_(1.0)
    lookahead.update(0.5)  # the average keeps 0.95^5 / 8 of itself, and the weights become it
    keep = 0.95 ** 5 * 0.125
    assert torch.allclose(model[0].weight, keep * (start + 1) + (1 - keep) * (start + 2))
    before = model[0].weight.detach().clone()
    with torch.no_grad():
        model[0].weight.add_(5.0)
        model[1].running_mean.add_(3.0)
    lookahead.update(1.0)  # the end: the average takes in the last steps, BatchNorm statistics included
    keep = 0.95 ** 5
    assert torch.allclose(model[0].weight, keep * before + (1 - keep) * (before + 5))
    assert torch.allclose(model[1].running_mean, torch.full((2,), (1 - keep) * 3.0))
    assert torch.equal(lookahead.slow["0.weight"], model[0].weight)  # and the run ends on it
    assert "1.num_batches_tracked" not in lookahead.slow  # integers are not averaged


def test_the_last_epoch_of_a_lookahead_run_trains() -> None:
    """Epochs of fewer than Lookahead.EVERY steps (fit_batch makes 4 on a small lake) have no
    update but the epoch's end, and the last one returned to the average of the epoch before:
    the final epoch's weights were the previous epoch's, bit for bit, and its training was lost."""
    from distcls.train import train_epoch

    torch.manual_seed(0)
    config = TrainConfig(input="lake", output="out", epochs=2, precision="fp32")  # airbench: lookahead on
    model = create_model("airbench", num_classes=2)
    optimizer = torch.optim.SGD(param_groups(model, config), lr=config.lr, momentum=config.momentum, nesterov=True)
    images, labels = torch.randint(0, 256, (16, 32, 32, 3), dtype=torch.uint8), torch.arange(16) % 2
    lookahead, generator = Lookahead(model), torch.Generator().manual_seed(0)
    for epoch in range(config.epochs):
        before = {name: value.clone() for name, value in model.state_dict().items()}
        train_epoch(model, optimizer, zip(images.split(4), labels.split(4)), {"mean": (0.5,) * 3, "std": (0.25,) * 3},
                    config, epoch, 4, generator, torch.device("cpu"), lookahead)
        assert not torch.equal(model.head.weight, before["head.weight"]), f"epoch {epoch + 1} changed nothing"
