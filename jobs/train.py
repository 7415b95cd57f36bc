"""Train a classifier on a labelled lake: the `distcls train` command as a Ray job entrypoint.

Locally (starts Ray in-process):
    python jobs/train.py --config jobs/configs/cifar10_train.yaml --input /data/cifar10/train --output runs/cifar10

On a Ray cluster (the image has distcls installed; --working-dir ships your checkout instead):
    ray job submit --address http://127.0.0.1:8265 --working-dir . -- \
        python jobs/train.py --config jobs/configs/cifar10_train.yaml \
        --input s3://my-bucket/cifar10/train --output s3://my-bucket/runs/cifar10 \
        --workers 4 --cpus-per-worker 8   # one 8-CPU worker node each

On KubeRay (k8s/base/cronjob-train.yaml is the template):
    kubectl -n distcls create job --from=cronjob/distcls-train train-$(date +%s)

Every flag of `distcls train --help` works here and overrides the YAML file.
"""
import sys

from distcls.cli import run

if __name__ == "__main__":
    run(["train", *sys.argv[1:]])
