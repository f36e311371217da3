#!/usr/bin/env node
// node-echo, in Node: answers every message with its body.
//
// readSync on the inbox blocks until a message waits and returns one whole
// message (one line). The next read acknowledges the one before it.
"use strict";
const fs = require("fs");

const inbox = fs.openSync("inbox", "r");
const outbox = fs.openSync("outbox", fs.constants.O_WRONLY);
const buf = Buffer.alloc(1 << 20);
let parts = [];

for (;;) {
  const n = fs.readSync(inbox, buf, 0, buf.length, null);
  if (n === 0) break;
  parts.push(Buffer.from(buf.subarray(0, n)));
  if (buf[n - 1] !== 0x0a) continue; // the rest of a long message follows
  const msg = JSON.parse(Buffer.concat(parts).toString("utf8"));
  parts = [];
  // No "to": a reply to the message in hand, sent back to its sender.
  fs.writeSync(outbox, JSON.stringify({ body: msg.body }) + "\n");
}
