#!/usr/bin/env bash
# intake, in bash with jq: the desk's front door.
#
# Each request (plain text, or {"customer": ..., "text": ...}) gets a kind --
# refund, bug, question or other -- and goes to topics/desk as
#   {"kind": ..., "text": ..., "customer": ..., "ticket": ID, "amount": N}
# The topic's rules, not intake, decide who gets it. A request no rule takes
# is refused with ENOENT: intake prints why (its output file shows it).
# A refund the operator rejected comes back here as a notice; intake prints it.
set -euo pipefail

desk="$OUTHEIS_MOUNT/topics/desk"

kind_of() {
  local text=${1,,}
  if [[ $text =~ refund|money\ back|charged\ twice ]]; then
    echo refund
  elif [[ $text =~ crash|bug|error|broken ]]; then
    echo bug
  elif [[ $text == *\?* ]]; then
    echo question
  else
    echo other
  fi
}

exec 3<inbox
while IFS= read -r msg <&3; do
  if jq -e '.rejected != null' <<<"$msg" >/dev/null; then
    echo "refund for ticket $(jq -r .body.body.ticket <<<"$msg") rejected: $(jq -r .rejected <<<"$msg")"
    continue
  fi
  text=$(jq -r 'if (.body | type) == "object" then .body.text else .body end' <<<"$msg")
  customer=$(jq -r 'if (.body | type) == "object" then (.body.customer // .from) else .from end' <<<"$msg")
  kind=$(kind_of "$text")
  # The first amount of money named, if any: "30 EUR", "12.50 €", "$40".
  amount=$(grep -oE '[0-9]+([.][0-9]+)? ?(EUR|eur|€)|[$][0-9]+([.][0-9]+)?' <<<"$text" |
    head -n1 | tr -dc '0-9.' || true)
  line=$(jq -nc --arg kind "$kind" --arg text "$text" --arg customer "$customer" \
    --arg ticket "$(jq -r .id <<<"$msg")" --arg amount "$amount" \
    '{body: ({kind: $kind, text: $text, customer: $customer, ticket: $ticket}
             + if $amount == "" then {} else {amount: ($amount | tonumber)} end)}')
  if printf '%s\n' "$line" 2>/dev/null >"$desk"; then
    echo "ticket $(jq -r .id <<<"$msg"): $kind"
  else
    # A refused write returns only an errno: the reason is the last line of errors.
    echo "ticket $(jq -r .id <<<"$msg") not routed ($kind): $(tail -n1 errors | jq -r .why)"
  fi
done
