#!/bin/bash
# A pool worker in bash with jq: answers each message; "boom" makes it crash.
while IFS= read -r line < inbox; do
    body=$(jq -r .body <<<"$line")
    if [ "$body" = boom ]; then
        exit 1
    fi
    jq -c '{body: {done: .body}}' <<<"$line" > outbox
done
