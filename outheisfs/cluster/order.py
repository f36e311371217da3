"""The stream's order decides: which events of several hosts take effect.

Several hosts publish into one stream at once, each deciding on what it knew
when it published. Applied in the stream's order, some of those decisions
came too late: a `deliver` of a message another host's reader took first, an
`ack` from a host whose reader no longer holds the message, a `host-gone`
that another host has reported already. `Order.apply` keeps what the log
order allows and passes the rest over (it stays in the log; every host, and
`replay`, passes it over alike). It also keeps what only a cluster needs:
which host each held message is with, which hosts are up (by their `mount`,
`umount` and `host-gone` events) and where each agent's processes run.

Pure like the dispatcher: no trio, no NATS; the same stream applied anywhere
gives the same state.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from .. import events
from ..dispatcher import Dispatcher
from ..events import Event
from ..models import DEAD, INFLIGHT, Message

HOST_GONE = "host-gone"


def host_gone(host: str, since: int) -> Event:
    """Host `host`, up since the event `since` (its `mount`), is gone."""
    return {"type": HOST_GONE, "host": host, "since": since}


@dataclass
class Order:
    """The cluster's part of the state, and the rules of the stream's order."""

    up: dict[str, int] = field(default_factory=dict)  # host -> seq of its mount event
    holder: dict[str, str] = field(default_factory=dict)  # message id -> its reader's host
    runs_on: dict[str, str | None] = field(default_factory=dict)  # agent -> host
    # Told (agent, old host, new host) when an agent's host changes, live only.
    moved: Callable[[str, str | None, str | None], None] | None = None

    def apply(self, d: Dispatcher, ev: Event) -> bool:
        """Apply one event of the stream; False if the order made it void."""
        kind = ev["type"]
        host = ev.get("host")
        if kind == "deliver":
            msg = d.messages.get(ev["id"])
            if msg is None or msg.to != ev["agent"] or msg.state in (INFLIGHT, DEAD):
                return False  # another reader's came first, or it is gone
            if ev["attempt"] != msg.delivered + 1:
                return False
            if host is not None and host not in self.up:
                return False  # its host was declared gone before this arrived
            d.apply(ev)
            if host is not None:
                self.holder[msg.id] = host
            return True
        if kind in ("ack", "redeliver", "nack", "progress"):
            msg = d.messages.get(ev["id"])
            if msg is None or msg.state != INFLIGHT or not self._holds(msg.id, host):
                return False
            d.apply(ev)
            if kind != "progress":
                self.holder.pop(msg.id, None)
            return True
        if kind == "dead":
            msg = d.messages.get(ev["id"])
            if msg is None or (msg.state == INFLIGHT and not self._holds(msg.id, host)):
                return False
            d.apply(ev)
            self.holder.pop(msg.id, None)
            return True
        if kind == "requeue":
            agent = d.agents.get(ev["agent"])
            if agent is None or ev["id"] not in agent.dead_letters:
                return False
        if kind == "mount" and isinstance(host, str):
            d.apply(ev)
            # Whatever its earlier run still held is delivered again.
            self._give_back(d, ev, host, "host restarted while in flight")
            self.up[host] = ev["seq"]
            self._place(d)
            return True
        if kind == "umount" and isinstance(host, str):
            d.apply(ev)
            self._give_back(d, ev, host, "host stopped while in flight", counted=False)
            self.up.pop(host, None)
            self._place(d)
            return True
        if kind == HOST_GONE:
            if not isinstance(host, str) or self.up.get(host) != ev.get("since"):
                return False  # reported already, or it came back since
            d.seq = ev["seq"]
            self._give_back(d, ev, host, f"host {host} gone while in flight")
            del self.up[host]
            self._place(d)
            return True
        d.apply(ev)
        return True

    def _holds(self, msg_id: str, host: object) -> bool:
        """Whether an event from `host` may settle the message (None: a host-less
        event, as a single host writes them)."""
        return host is None or self.holder.get(msg_id) == host

    def _give_back(
        self, d: Dispatcher, ev: Event, host: str, why: str, counted: bool = True
    ) -> None:
        """The messages `host`'s readers held: queued again (attempt + 1), or dead
        after max_attempts."""
        held = [i for i, h in self.holder.items() if h == host]
        for msg_id in held:
            del self.holder[msg_id]
            msg: Message | None = d.messages.get(msg_id)
            if msg is None or msg.state != INFLIGHT:
                continue
            if counted and msg.delivered >= d.config.max_attempts:
                back = events.dead(msg.to, msg.id, msg.delivered, why)
            else:
                back = events.redeliver(msg.to, msg.id, msg.delivered + 1, why)
                if not counted:
                    back["counted"] = False
            d.apply({"seq": ev["seq"], "ts": ev["ts"], **back})

    def _place(self, d: Dispatcher) -> None:
        """Each agent with a command runs on the host it runs on while that host
        is up; else on the first host of its list that is up (none: nowhere)."""
        for name, ac in d.config.agents.items():
            if not ac.command:
                continue
            old = self.runs_on.get(name)
            new = old if old in self.up else next((h for h in ac.hosts if h in self.up), None)
            if new != old:
                self.runs_on[name] = new
                if self.moved is not None:
                    self.moved(name, old, new)
