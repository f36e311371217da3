#!/usr/bin/env node
// refunds, in Node: pays out. Every message to it waits at the approval gate
// (`approve = ["*"]`) until the operator writes `approve ID` to the root ctl,
// so a message read here has been approved by a person.
//
// "Paying" appends a line to vault/payouts/ledger.jsonl (the domain is its
// own) and tells the customer's desk (the operator's mailbox). Delivery is at
// least once (a request may come twice, e.g. when intake was killed before it
// acknowledged one), so a ticket already in the ledger is never paid again.
"use strict";
const fs = require("fs");
const path = require("path");

const ledger = path.join(process.env.OUTHEIS_MOUNT, "vault", "payouts", "ledger.jsonl");
const inbox = fs.openSync("inbox", "r");
const outbox = fs.openSync("outbox", fs.constants.O_WRONLY);
const buf = Buffer.alloc(1 << 20);
let parts = [];

function paidTickets() {
  if (!fs.existsSync(ledger)) return new Set();
  const lines = fs.readFileSync(ledger, "utf8").split("\n").filter(Boolean);
  return new Set(lines.map((line) => JSON.parse(line).ticket));
}

for (;;) {
  const n = fs.readSync(inbox, buf, 0, buf.length, null);
  if (n === 0) break;
  parts.push(Buffer.from(buf.subarray(0, n)));
  if (buf[n - 1] !== 0x0a) continue; // the rest of a long message follows
  const msg = JSON.parse(Buffer.concat(parts).toString("utf8"));
  parts = [];
  const req = typeof msg.body === "object" && msg.body !== null ? msg.body : { text: msg.body };
  const reply = { ticket: req.ticket, customer: req.customer, by: "refunds" };
  if (paidTickets().has(req.ticket)) {
    reply.answer = "This refund was paid already.";
  } else if (typeof req.amount === "number" && req.amount > 0) {
    const paid = { ticket: req.ticket, customer: req.customer, amount: req.amount, approved: msg.id, ts: new Date().toISOString() };
    fs.appendFileSync(ledger, JSON.stringify(paid) + "\n");
    reply.paid = req.amount;
    reply.answer = `We refunded ${req.amount} EUR; it reaches your card within five working days.`;
  } else {
    reply.answer = "Please tell us the amount to refund.";
  }
  fs.writeSync(outbox, JSON.stringify({ to: "user", body: reply }) + "\n");
  console.log(`ticket ${req.ticket}: ${reply.paid ? "paid " + reply.paid : "no amount"}`);
}
