#!/usr/bin/env bash
# Runs of benchmarks/GPU.md on a lent GPU machine, in order, inside one device call:
#   bash benchmarks/gpu_session.sh 8 9        (from the repository root, with carry [".whl"];
#   run 11 also needs [".carry/data"], runs 12-13 [".carry/data256"], made by benchmarks/gpu_data.py)
# Installs the carried wheels once per machine, compiles them (the image ships torch without .pyc),
# keeps models and samples under /tmp/b (a warm machine's next call reuses them) and copies each
# run's JSON / Markdown / log to $OUT. Every run is cut at DEADLINE seconds (default 570) after the
# start of this script, so the call returns inside the device's 10-minute limit with what it measured.
set -u
deadline=${DEADLINE:-570}
out=${OUT:-/tmp/b/out}
mkdir -p /tmp/b "$out"
if [ ! -f /tmp/site/.installed ]; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
    python3 -m compileall -q -j 16 /tmp/site src > /dev/null
    touch /tmp/site/.installed
fi
export PYTHONPATH=/tmp/site:src PYTHONUNBUFFERED=1

ad="--method anomalydiffusion --arch ldm --model-dir /tmp/b/ldm --fit-steps 30 --epochs 0"
declare -A runs=(
    [1]="python3 benchmarks/dualanodiff_speed.py --out $out/dualanodiff_speed.json"
    [2]="python3 benchmarks/dualanodiff_speed.py --no-bcm --out $out/dualanodiff_nobcm.json"
    [3]="python3 benchmarks/anomalydiffusion_speed.py --arch ldm --dtypes fp32 bf16 --out $out/ad_ldm.json"
    [4]="python3 benchmarks/anomalydiffusion_speed.py --arch sd15 --dtypes bf16 --out $out/ad_sd15.json"
    [5]="python3 benchmarks/cagen_speed.py --out $out/cagen_speed.json"
    [6]="python3 benchmarks/draem_augmentation_speed.py --out $out/draem_speed.json"
    [7]="python3 benchmarks/anomalyxfusion_speed.py --out $out/anomalyxfusion_speed.json"
    [8]="python3 benchmarks/cli_speed.py $ad --num 400 --num-official 16 --set mask_source=augment --unet-calls 200 --out /tmp/b/run8"
    [9]="python3 benchmarks/cli_speed.py $ad --only ours --num 128 --compile --set mask_tries=1 --unet-calls 400 --out /tmp/b/run9"
    [10]="python3 benchmarks/cli_speed.py --method croppaste --num 500 --out /tmp/b/run10"
    # runs 8 and 9 cut to fit one call together (a session's 15 minutes of device time: GPU.md)
    [14]="python3 benchmarks/cli_speed.py $ad --num 256 --num-official 8 --set mask_source=augment --unet-calls 200 --out /tmp/b/run14"
    [15]="python3 benchmarks/cli_speed.py $ad --only ours --num 64 --compile --set mask_tries=1 --unet-calls 400 --out /tmp/b/run15"
    [11]="python3 -m anomalygen.cli pretrain --data .carry/data/magnetic_tile --data .carry/data/hazelnut_toy --out /tmp/b/prior128 --resolution 128 --size base --time-budget ${BUDGET_MIN:-7.5} --device cuda"
    # issue 13 at GPU size: run 12 twice (it resumes) gives a ~17-min prior, then run 13 as often as needed (it resumes its cells)
    [12]="python3 -m anomalygen.cli pretrain --data .carry/data256/magnetic_tile --data .carry/data256/hazelnut_toy --out /tmp/b/prior256 --resolution 256 --size base --time-budget ${BUDGET_MIN:-8.5} --vae-share 0.6 --device cuda ${PRIOR_FLAGS:-}"
    [13]="python3 benchmarks/learning.py --data .carry/data256/magnetic_tile --data .carry/data256/hazelnut_toy --out /tmp/b/learning256 --prior magnetic_tile=/tmp/b/prior256 --prior hazelnut_toy=/tmp/b/prior256 --device cuda --resolution 256 --skip-bad --num-per-type 32 --steps 500 --sampling-steps 50 --batch-size 4 --epochs 20 --samples-per-epoch 200 --unet-base 64 --set dualanodiff.lr=1e-4 --seeds 0 1"
)
for run in "$@"; do
    left=$((deadline - SECONDS))
    if [ "$left" -lt 30 ]; then echo "run $run: skipped, ${left} s left"; continue; fi
    echo "run $run (${left} s left): ${runs[$run]}"
    timeout "$left" ${runs[$run]} > "$out/run$run.log" 2>&1
    echo "run $run: exit $? after $SECONDS s"
    [ -f "/tmp/b/run$run/cli_speed.json" ] && cp "/tmp/b/run$run/cli_speed.json" "$out/run$run.json"  # 8 files come back at most
    if [ "$run" = 11 ] || [ "$run" = 12 ]; then  # the prior stays on the machine: its report, grids and loss logs come back
        prior=$([ "$run" = 11 ] && echo prior128 || echo prior256)
        for f in pretrain.json samples.png loss.png training/vae/loss.csv training/unet/loss.csv; do
            [ -f "/tmp/b/$prior/$f" ] && cp "/tmp/b/$prior/$f" "$out/$prior-$(echo "$f" | tr / -)"
        done
    fi
    if [ "$run" = 13 ]; then  # finished cells' records and, once all are done, the table and grids
        (cd /tmp/b/learning256 && find cells -name cell.json -o -name error.txt | tar czf "$out/learning256-cells.tgz" -T -)
        cp /tmp/b/learning256/learning.* /tmp/b/learning256/samples-*.png "$out/" 2>/dev/null
    fi
    tail -n 3 "$out/run$run.log"
done
