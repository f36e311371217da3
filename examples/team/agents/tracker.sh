#!/usr/bin/env bash
# tracker, in bash with jq: files each bug report as vault/bugs/TICKET.json
# (the domain `bugs` is its own: only it and the operator may change it) and
# tells the customer's desk (the operator's mailbox) where it is.
set -euo pipefail

bugs="$OUTHEIS_MOUNT/vault/bugs"
exec 3<inbox
while IFS= read -r msg <&3; do
  ticket=$(jq -r .body.ticket <<<"$msg")
  jq '{ticket: .body.ticket, customer: .body.customer, text: .body.text, reported: .ts,
       status: "open"}' <<<"$msg" >"$bugs/$ticket.json"
  jq -nc --arg ticket "$ticket" --arg customer "$(jq -r .body.customer <<<"$msg")" \
    '{to: "user", body: {ticket: $ticket, customer: $customer, by: "tracker",
      answer: ("Thanks, we filed your report as bug " + $ticket + ".")}}' >outbox
done
