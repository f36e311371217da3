#!/usr/bin/env bash
# intake, in bash with jq: the first stage of a pipeline.
#
# A job from anyone is handed to the worker pool, tagged with who asked; a
# result coming back from a worker is passed on to the one who asked.
#   echo 'count these words' > agents/intake/inbox
#   head -n1 agents/user/inbox    # {"words": 3, ...} from intake
set -euo pipefail

exec 3<inbox
while IFS= read -r msg <&3; do
  if jq -e '.from == "worker" and .reply_to != null' <<<"$msg" >/dev/null; then
    line=$(jq -c '{to: .body.for, body: .body}' <<<"$msg")
  else
    line=$(jq -c '{to: "worker", body: {job: .body, for: .from}}' <<<"$msg")
  fi
  # A refused write returns only an errno: the reason is the last line of errors.
  if ! printf '%s\n' "$line" >outbox; then
    echo "intake: not sent: $(tail -n1 errors | jq -r .why)" >&2
  fi
done
