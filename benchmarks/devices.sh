#!/usr/bin/env bash
# The merchant's commands on CPU and on CUDA in the same run: pretrain, DP train, score, wall seconds each.
#   bash benchmarks/devices.sh OUT_DIR [EVENTS]
# Needs `fedanom` on PATH (or FEDANOM="python -m fedanom"); prints one JSON line per command and device.
set -euo pipefail
out=${1:?usage: devices.sh OUT_DIR [EVENTS]}
events=${2:-200000}
fedanom=${FEDANOM:-fedanom}
mkdir -p "$out"
python3 -m fedanom.simulations.shop "$out/public.csv" --events "$events" --seed 1
python3 -m fedanom.simulations.shop "$out/merchant.csv" --events "$events" --seed 2
timed() {  # name device command...: runs it, prints {"step", "device", "seconds"}
  local name=$1 device=$2
  shift 2
  local start end
  start=$(date +%s.%N)
  "$@" >"$out/$name-$device.log" 2>&1 || { cat "$out/$name-$device.log"; exit 1; }
  end=$(date +%s.%N)
  python3 -c "import json,sys; print(json.dumps({'step': sys.argv[1], 'device': sys.argv[2], \
'seconds': round(float(sys.argv[4]) - float(sys.argv[3]), 2)}))" "$name" "$device" "$start" "$end"
}
for device in cpu cuda; do
  d="$out/$device"
  timed pretrain "$device" $fedanom pretrain --data "$out/public.csv" --preset taobao --out "$d/base" \
    --device "$device"
  timed train "$device" $fedanom train --data "$out/merchant.csv" --preset taobao --base "$d/base" \
    --out "$d/detector" --epsilon 8 --state-dir "$d/state" --device "$device"
  timed score "$device" $fedanom score --data "$out/merchant.csv" --preset taobao --model "$d/detector" \
    --out "$d/scores.csv" --device "$device"
  tail -n 1 "$out/train-$device.log"
done
