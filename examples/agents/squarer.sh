#!/usr/bin/env bash
# squarer, in bash with jq: one of a pool that squares numbers for the planner.
# It acks automatically (by its next read); its reply goes back to the planner
# by `reply_to`, without a right to send to it.
set -euo pipefail

exec 3<inbox
while IFS= read -r msg <&3; do
  sleep "${WORK_SECONDS:-0}"
  jq -c '{reply_to: .id, body: (.body + {square: (.body.n * .body.n)})}' <<<"$msg" >outbox
done
