"""Label an image lake into a Parquet dataset: the `distcls label` command as a Ray job entrypoint.

Locally (starts Ray in-process):
    python jobs/label.py --config jobs/configs/nightly_label.yaml \
        --input /data/lake --model runs/cifar10/model --output /data/labels

On a Ray cluster (the image has distcls installed; --working-dir ships your checkout instead):
    ray job submit --address http://127.0.0.1:8265 --working-dir . -- \
        python jobs/label.py --config jobs/configs/nightly_label.yaml \
        --input s3://my-bucket/lake/ --model s3://my-bucket/runs/cifar10/model --output s3://my-bucket/labels/

On KubeRay (the nightly run, k8s/base/cronjob-nightly-label.yaml; run it now with):
    kubectl -n distcls create job --from=cronjob/distcls-nightly-label label-now-$(date +%s)

No actor counts to set: the inference pool grows with what the cluster can add (see --help for
--min-actors/--max-actors/--cpus-per-actor/--gpus-per-actor/--memory-per-actor).

Every flag of `distcls label --help` works here and overrides the YAML file.
"""
import sys

from distcls.cli import run

if __name__ == "__main__":
    run(["label", *sys.argv[1:]])
