#!/usr/bin/env bash
# planner, in bash with jq: plans from a folder of notes it may not read by itself.
#
# {"plan": FOLDER} from anyone: ask notes (the domain's owner) for read access,
# tagged with the request's id. When notes grants it, the folder appears in this
# very process's view at once: read it, answer the request (by reply_to, at any
# later time), and hand the access back with {"done": FOLDER}. A refusal is
# passed on to whoever asked.
set -euo pipefail

notes="$OUTHEIS_MOUNT/vault/notes"
send() {
  # A refused write returns only an errno: the reason is the last line of errors.
  if ! printf '%s\n' "$1" >outbox; then
    echo "planner: not sent: $(tail -n1 errors | jq -r .why)" >&2
  fi
}

exec 3<inbox
while IFS= read -r msg <&3; do
  from=$(jq -r .from <<<"$msg")
  if [[ $from != notes ]]; then
    if jq -e '.body | type == "object" and (.plan | type == "string")' <<<"$msg" >/dev/null; then
      send "$(jq -c '{to: "notes", body: {want: .body.plan, for: .id}}' <<<"$msg")"
    else
      send "$(jq -c '{reply_to: .id, body: {refused: .body, why: "give {\"plan\": FOLDER}"}}' <<<"$msg")"
    fi
    continue
  fi
  for=$(jq -r .body.for <<<"$msg")
  if jq -e '.body.granted == null' <<<"$msg" >/dev/null; then
    send "$(jq -c '{reply_to: .body.for, body: {refused: .body.refused, why: .body.why}}' <<<"$msg")"
    continue
  fi
  folder=$(jq -r .body.want <<<"$msg")
  files='[]'
  for f in "$notes/$folder"/*; do
    [[ -f $f ]] || continue
    files=$(jq -c --arg name "${f##*/}" --arg title "$(head -n1 "$f")" \
      --argjson lines "$(wc -l <"$f")" '. + [{name: $name, title: $title, lines: $lines}]' \
      <<<"$files")
  done
  send "$(jq -nc --arg for "$for" --arg folder "$folder" --argjson files "$files" \
    '{reply_to: $for, body: {plan: $folder, files: $files, lines: ([$files[].lines] | add)}}')"
  send "$(jq -nc --arg folder "$folder" '{to: "notes", body: {done: $folder}}')"
done
