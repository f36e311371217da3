#!/usr/bin/env bash
# Send a burst of N jobs (default 200) to the worker pool, watch it grow and
# shrink, and print how long the burst took.
#   bash examples/burst/burst.sh [N] [MOUNTPOINT]
set -euo pipefail
n=${1:-200}
mnt=${2:-${OUTHEIS_MOUNT:-mount}}
ctl=$mnt/agents/worker/ctl
start=$(date +%s.%N)
seq "$n" > "$mnt/agents/worker/inbox"            # one job per line
got=0
while (( got < n )); do                           # the answers come to the operator
    head -n1 "$mnt/agents/user/inbox" > /dev/null
    got=$((got + 1))
    if (( got % 50 == 0 )); then echo "$got answers; $(grep ^instances "$ctl")"; fi
done
end=$(date +%s.%N)
echo "$n jobs in $(awk "BEGIN { printf \"%.2f\", $end - $start }") s"
echo "waiting for the pool to shrink back to min ..."
until grep -q '^instances 1 ' "$ctl"; do sleep 0.5; done
grep ^instances "$ctl"
grep -h '"type":"scale"' "$mnt/agents/worker/log" | tail -n 8
