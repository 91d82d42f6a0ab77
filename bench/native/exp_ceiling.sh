#!/usr/bin/env bash
# Build bench/native/exp_ceiling.cpp against the shipped row kernels and append its rates to
# bench/results/exp_ceiling.csv (one line per dtype x threads, with the CPU model and git sha). Run alone.
set -euo pipefail
cd "$(dirname "$0")/../.."
out=/tmp/gvu_exp_ceiling
g++ -O3 -std=c++17 -fopenmp -fno-math-errno -fno-trapping-math -Ikernels/csrc bench/native/exp_ceiling.cpp \
    kernels/csrc/row_kernels.cpp -o "$out"
csv=bench/results/exp_ceiling.csv
[ -f "$csv" ] || echo "timestamp,git_sha,cpu,loadavg,dtype,threads,simd,l1_glogits_s,stream_glogits_s,read_glogits_s" > "$csv"
cpu=$(grep -m1 "model name" /proc/cpuinfo | cut -d: -f2 | sed 's/^ *//; s/,/ /g')
sha=$(git rev-parse --short HEAD)$(git diff --quiet -- kernels/csrc || echo -dirty)
echo "dtype,threads,simd,l1,stream,read (G logits/s)"
for t in ${THREADS:-1 2}; do
  load=$(cut -d' ' -f1-3 /proc/loadavg | tr ' ' '/')
  "$out" "$t" | while IFS= read -r line; do
    echo "$line"
    echo "$(date -u +%Y-%m-%dT%H:%M:%SZ),$sha,$cpu,$load,$line" >> "$csv"
  done
done
