#!/bin/bash
# Fixed cost of `distcls label` (start-up, Ray, actors, commit, shut-down), old checkout vs new:
# a 1,000-image lake of 32x32 CIFAR-10 JPEGs, so the wall time is mostly fixed cost. Runs
# alternate (old, new) x TRIALS so that machine noise hits both; prints wall s, load, images/s.
#   bench/bench_fixed_cost.sh OLD_CHECKOUT OLD_MODEL NEW_CHECKOUT NEW_MODEL LAKE [TRIALS]
# Each model is an artifact the checkout can load (model.json formats differ between versions).
set -u
old=$1 old_model=$2 new=$3 new_model=$4 lake=$5 trials=${6:-3}
python=${PYTHON:-$(dirname "$0")/../.venv/bin/python}
out=$(mktemp -d)
for i in $(seq "$trials"); do
  for which in old new; do
    if [ "$which" = old ]; then checkout=$old model=$old_model; else checkout=$new model=$new_model; fi
    start=$(date +%s.%N)
    (cd "$checkout" && PYTHONPATH="$checkout" "$python" -m distcls.cli label --input "$lake" --model "$model" \
       --output "$out/$which-$i" >"$out/$which-$i.json" 2>"$out/$which-$i.err")
    rc=$?
    wall=$(echo "$(date +%s.%N) - $start" | bc)
    rate=$("$python" -c "import json,sys; print(json.load(open(sys.argv[1]))['images_per_s'])" "$out/$which-$i.json" 2>/dev/null)
    echo "$which trial $i rc=$rc wall_s=$wall load=$(cut -d' ' -f1 /proc/loadavg) images_per_s=${rate:-?}"
  done
done
rm -rf "$out"
