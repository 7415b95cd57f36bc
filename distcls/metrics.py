"""Labeling metrics through Ray's metrics API (``ray.util.metrics``), so that they appear on every
Ray node's Prometheus endpoint (its ``metrics_export_port``) beside Ray's own. Ray prefixes the
names with ``ray_`` and counters end in ``_total``: ``distcls_images_labelled`` is scraped as
``ray_distcls_images_labelled_total``.

Counted where the work happens: the inference actors count the images they labelled and the
errors by kind as each batch is done (a batch that Ray retries is counted again: this is work
done, the committed counts are in ``_SUCCESS``); the driver sets the gauges of a run once it is
committed. A series of an actor or driver that has ended stays on its node's endpoint (Ray 2.60
keeps it), so a scrape after a short run still finds it.
"""
from __future__ import annotations

import functools
from collections.abc import Mapping
from typing import Any

from ray.util import metrics

IMAGES_LABELLED = "distcls_images_labelled"
IMAGE_ERRORS = "distcls_image_errors"
IMAGES_PER_SECOND = "distcls_images_per_second"
RUN_SECONDS = "distcls_run_seconds"
LABEL_DRIFT = "distcls_label_drift"


@functools.cache
def _counter(name: str, description: str, tags: tuple[str, ...] = ()) -> metrics.Counter:
    # Made once per process, on first use: in an actor, per batch otherwise.
    return metrics.Counter(name, description=description, tag_keys=tags)


@functools.cache
def _gauge(name: str, description: str, tags: tuple[str, ...]) -> metrics.Gauge:
    return metrics.Gauge(name, description=description, tag_keys=tags)


def count_batch(labelled: int, errors_by_kind: Mapping[str, int]) -> None:
    """In an inference actor: one batch's labelled images and its errors by kind."""
    if labelled:
        _counter(IMAGES_LABELLED, "Images given a label by distcls label.").inc(labelled)
    for kind, count in errors_by_kind.items():
        _counter(IMAGE_ERRORS, "Images distcls label could not label, by error kind.", ("kind",)).inc(
            count, tags={"kind": kind})


def record_run(output: str, summary: Mapping[str, Any]) -> None:
    """On the driver: the committed run's images/s, duration and label drift (total variation to
    each reference it had), tagged with the output dataset (not the run's partition: one series
    per output, however many runs)."""
    _gauge(IMAGES_PER_SECOND, "Images per second of the last committed distcls label run.", ("output",)).set(
        float(summary["images_per_s"]), tags={"output": output})
    _gauge(RUN_SECONDS, "Duration in seconds of the last committed distcls label run.", ("output",)).set(
        float(summary["seconds"]), tags={"output": output})
    for reference, found in (summary.get("quality") or {}).get("references", {}).items():
        if found and found.get("total_variation") is not None:
            _gauge(LABEL_DRIFT, "Total variation distance between the last run's label distribution and a reference "
                                "(validation, previous_runs).", ("output", "reference")).set(
                float(found["total_variation"]), tags={"output": output, "reference": reference})
