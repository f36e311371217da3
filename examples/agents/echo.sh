#!/usr/bin/env bash
# echo, in bash with jq: answers every message with its body.
#
# The inbox stays open on fd 3, so each read acknowledges the message before
# it. If this script dies while handling a message, the message is delivered
# again (to the restarted script). A reply written to the outbox without "to"
# goes back to the sender of the message in hand.
set -euo pipefail

exec 3<inbox
while IFS= read -r msg <&3; do
  jq -c '{body: .body}' <<<"$msg" >outbox
done
