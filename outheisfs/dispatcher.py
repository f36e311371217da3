"""The dispatcher: agents, their queues and in-flight messages, as a state machine.

Every change is first written to the event log and then applied by `apply`, the
same function that rebuilds the state at start-up: the live state is, by
construction, what a replay of the log gives. The same events applied
on any machine give the same state, so the dispatcher holds nothing else: no
waiting (trio), no FUSE, no processes. Who is asking and where to wait is its
callers' business (`openfile`); they learn of each applied event through
`listeners` (to wake a reader parked on an inbox, for one). Process state
(running, pids, restarts) is the supervisor's. The dispatcher routes and never
rewrites a body.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from . import events, flows, gate, grants, routing
from .config import AgentConfig, Config, valid_name
from .errors import BadInput, Busy, Exists, NotEmpty, NotFound, TooBig
from .events import Event
from .inbox import Inbox
from .models import DEAD, EXTRA, HELD, INFLIGHT, QUEUED, Draft, Message, new_id, parse_ts
from .names import OPERATOR
from .views import HIDE, View, normalize

if TYPE_CHECKING:  # only its type: the log and its trio-based waiting stay apart
    from .eventlog import EventLog

log = logging.getLogger(__name__)


@dataclass(eq=False)
class Agent:
    name: str
    config: AgentConfig | None
    priority: str
    inbox: Inbox
    inflight: dict[str, Message] = field(default_factory=dict)
    delayed: dict[str, Message] = field(default_factory=dict)  # nacked with a delay
    dead_letters: dict[str, Message] = field(default_factory=dict)
    held: dict[str, Message] = field(default_factory=dict)  # waiting for approval (`gate`)
    delivered: int = 0
    dead: int = 0
    origin: str = "config"  # config | mkdir | message (created by a message to it)
    grants: dict[str, str] = field(default_factory=dict)  # its view, see views.py
    instances: int = 0  # processes it should run now: config, ctl `instances N`, `scale`

    @property
    def queued(self) -> int:
        return len(self.inbox)


class Dispatcher:
    def __init__(self, config: Config, log: EventLog | None) -> None:
        self.config = config
        self.log = log
        self.agents: dict[str, Agent] = {}
        self.messages: dict[str, Message] = {}  # pending: queued or in flight
        self.seq = 0
        # Reply rights: message id -> (who received it, its sender), for
        # the last RECEIVED deliveries; and the instances ack_wait took messages from.
        self.received: dict[str, tuple[str, str]] = {}
        self.taken_back: dict[str, set[int | None]] = {}
        self._pairs: dict[tuple[str, str], tuple[str, str]] = {}
        # What owners of vault domains granted: grantee -> path -> owner (`grants`).
        self.granted: grants.Granted = {}
        # Told of every event applied live (not in replay), after it is applied.
        self.listeners: list[Callable[[Event], None]] = []
        self.topics: dict[str, routing.Topic] = {}
        self._add(OPERATOR, None, "builtin")
        self.install_config()

    def install_config(self, names: Iterable[str] | None = None) -> None:
        """The agents of the config in force, with their settings (again after replay,
        which may have brought back or retired agents of older configs); after a
        reload, only those named."""
        self.topics = {n: t.compiled(n) for n, t in self.config.topics.items()}
        for name, ac in self.config.agents.items():
            if names is not None and name not in names:
                continue
            agent = self.agents.get(name) or self._add(name, ac, "config")
            agent.config = ac
            agent.origin = "config"
            agent.priority = ac.priority
            agent.instances = ac.floor
        grants.prune(self)  # a grant lapses with its giver's ownership of the domain
        for name in self.config.agents:
            if names is None or name in names:
                self.agents[name].grants = self.base_grants(name)

    def reconfigure(self, config: Config, ev: Event) -> None:
        """A reload: log `ev` (its `reload` event: what changed), then take `config`
        as the one in force and install the agents it added, changed or resized."""
        self.record([ev])
        self.config = config
        running = {n: self.agents[n].instances for n in ev["resized"] if n in self.agents}
        self.install_config([*ev["added"], *ev["changed"], *ev["resized"]])
        for name, n in running.items():  # resized: the count it runs, within the new bounds
            ac = config.agents[name]
            self.agents[name].instances = min(max(n, ac.floor), ac.ceiling)
        for name in ev["removed"]:
            agent = self.agents.get(name)
            if agent is not None:
                agent.config = None

    def _add(self, name: str, ac: AgentConfig | None, origin: str) -> Agent:
        agent = Agent(
            name=name,
            config=ac,
            priority=ac.priority if ac else "normal",
            inbox=Inbox(self.config.aging),
            origin=origin,
            grants=self.base_grants(name),
        )
        self.agents[name] = agent
        return agent

    def base_grants(self, name: str) -> dict[str, str]:
        """The view an agent (re)starts with: its config's, and what owners granted it."""
        return grants.base(self, name)

    def agent(self, name: str) -> Agent:
        try:
            return self.agents[name]
        except KeyError:
            raise NotFound(f"no agent {name!r}") from None

    # -- the state machine ---------------------------------------------------------------

    def apply(self, ev: Event) -> None:
        """Apply one logged event. Used live (after logging) and by replay."""
        self.seq = ev["seq"]
        kind = ev["type"]
        if kind == "message":
            to = ev["to"]
            agent = self.agents.get(to) or self._add(to, None, "message")
            msg = Message(
                id=ev["id"],
                seq=ev["seq"],
                sender=ev["from"],
                to=to,
                ts=ev["ts"],
                t=parse_ts(ev["ts"]),
                priority=ev["priority"],
                body=ev["body"],
                reply_to=ev["reply_to"],
                extra={k: ev[k] for k in EXTRA if k in ev} or None,
            )
            self.messages[msg.id] = msg
            agent.inbox.push(msg)
        elif kind == "deliver":
            msg = self.messages[ev["id"]]
            agent = self.agents[msg.to]
            if agent.delayed.pop(msg.id, None) is None:
                agent.inbox.taken(msg)
            msg.state = INFLIGHT
            msg.delivered = ev["attempt"]
            msg.pid = ev.get("pid", 0)
            msg.instance = ev.get("instance")
            msg.deadline = ev.get("deadline", 0.0)
            agent.inflight[msg.id] = msg
            agent.delivered += 1
            pair = (msg.to, msg.sender)
            pair = self._pairs.setdefault(pair, pair)  # one tuple per pair, not per message
            flows.remember(self.received, msg.id, pair, flows.RECEIVED)
        elif kind == "ack":
            msg = self.messages.pop(ev["id"])
            del self.agents[msg.to].inflight[msg.id]
        elif kind == "redeliver":
            msg = self.messages[ev["id"]]
            agent = self.agents[msg.to]
            del agent.inflight[msg.id]
            if ev.get("counted") is False:  # the reader was stopped: not its failure
                msg.delivered -= 1
            if ev.get("reason") == "ack_wait":
                flows.remember(self.taken_back, msg.id, {msg.instance}, flows.TAKEN_BACK, True)
            agent.inbox.push(msg)
        elif kind == "dead":
            msg = self.messages.pop(ev["id"])
            agent = self.agents[msg.to]
            held = agent.inflight.pop(msg.id, None) or agent.delayed.pop(msg.id, None)
            if held is None and msg.state == QUEUED:
                agent.inbox.taken(msg)
            msg.state = DEAD
            msg.reason = ev.get("reason", "")
            msg.delivered = ev.get("attempts", msg.delivered)
            agent.dead_letters[msg.id] = msg
            agent.dead += 1
        elif kind == "agent":
            if ev["op"] == "create":
                if ev["agent"] not in self.agents:
                    self._add(ev["agent"], None, "mkdir")
            else:
                self.agents.pop(ev["agent"], None)
                grants.forget(self, ev["agent"])
        elif kind == "mount":
            # The agents of the config in force; a mount resets their priorities.
            # Agents of an older config that are gone from this one, and hold no
            # message, leave.
            current = ev.get("agents", {})
            for name, agent in list(self.agents.items()):
                idle = not (agent.queued or agent.inflight or agent.delayed or agent.held)
                if agent.origin == "config" and name not in current and idle:
                    del self.agents[name]
                    grants.forget(self, name)
            for name, prio in current.items():
                agent = self.agents.get(name) or self._add(name, None, "config")
                agent.origin = "config"
                agent.priority = prio
        elif kind == "reload":
            # Agents removed from the config leave, unless they hold messages:
            # then they stay as mailboxes without a process.
            for name in ev["removed"]:
                gone = self.agents.get(name)
                if gone is None:
                    continue
                if gone.queued or gone.inflight or gone.delayed:
                    gone.origin = "mkdir"
                    gone.instances = 0
                else:
                    del self.agents[name]
            for name in ev["added"]:
                if name not in self.agents:
                    self._add(name, None, "config")
        elif kind == "scale":
            scaled = self.agents.get(ev["agent"])
            if scaled is not None:
                scaled.instances = ev["instances"]
        elif kind == "ctl":
            words = ev["command"].split()
            target = self.agents.get(ev["agent"])
            if target is None:
                return
            if words[0] == "priority":
                target.priority = words[1]
            elif words[0] == "instances":
                target.instances = int(words[1])
            elif words[0] == "bind":
                target.grants = self.base_grants(target.name)
            elif words[0] == "unveil":
                target.grants = self._unveiled(target, ev["who"], words[1], words[2])
        elif kind == "start":
            # A (re)started process sees what its config and the owners grant, nothing narrowed.
            started = self.agents.get(ev["agent"])
            if started is not None:
                started.grants = self.base_grants(started.name)
        elif kind in flows.EVENTS:
            flows.apply(self, ev)
        elif kind in gate.EVENTS:
            gate.apply(self, ev)
        elif kind in grants.EVENTS:
            grants.apply(self, ev)

    def _unveiled(self, agent: Agent, who: str, path: str, perms: str) -> dict[str, str]:
        if who == agent.name:
            try:
                return View(agent.name, agent.grants).narrowed(path, perms)
            except ValueError:  # refused before it was logged; a hand-edited log
                return agent.grants
        path = normalize(path)
        grants = dict(agent.grants)
        if perms == HIDE:  # hidden: with everything granted below it
            grants = {g: p for g, p in grants.items() if not g.startswith(path.rstrip("/") + "/")}
        grants[path] = perms
        return grants

    def record(self, batch: Iterable[Event]) -> list[Event]:
        """Log events, then apply them. Raises OSError if the log refuses."""
        assert self.log is not None
        out = self.log.append(batch)
        for ev in out:
            self.apply(ev)
            for listener in self.listeners:
                listener(ev)
        return out

    def note(self, ev: Event) -> None:
        """Log an event that changes no state (error, denied, ...); never raises:
        a report must not turn into a failure of what it reports."""
        try:
            self.record([ev])
        except Exception:  # a full disk, a name that cannot be encoded
            log.exception("event not logged: %s", ev.get("type"))

    # -- operations ----------------------------------------------------------------------

    def plan(
        self,
        sender: str,
        drafts: list[Draft],
        default_to: str | None,
        held: tuple[str, ...] = (),
        topic: str | None = None,
    ) -> list[Event]:
        """Turn parsed lines into message events, checking everything first.

        `default_to` is the inbox written to; None for an outbox, where a draft
        without `to` is a reply to the message the sender holds in flight (of
        several, the one in `held`: the writing process's own). With `topic`,
        the topic's list and rules pick the destinations: a copy for each. A
        message to an agent that gates its sender is followed by its `held` event.
        """
        out: list[Event] = []
        src = self.agent(sender)
        for d in drafts:
            reply_to = d.reply_to
            if topic is not None:
                out += self._fan_out(src, topic, d)
                continue
            if d.to is not None:
                targets = d.to
            elif default_to is not None:
                targets = [default_to]
            elif reply_to is not None:  # a reply to a message it received, at any time
                targets = [flows.reply_target(self, sender, reply_to)]
            else:
                msg = self._held(src, reply_to, held)
                targets, reply_to = [msg.sender], msg.id
            for to in targets:
                if to not in self.agents:
                    raise NotFound(f"no agent {to!r}")
                priority = d.priority or src.priority
                out.append(events.message(new_id(), sender, to, priority, d.body, reply_to))
        counts: dict[str, int] = {}
        for ev in out:
            counts[ev["to"]] = counts.get(ev["to"], 0) + 1
        for to, n in counts.items():
            if n > self.config.max_queue:
                raise TooBig(f"{n} messages for {to!r} exceed its queue limit")
        return gate.hold(self, out)

    def _fan_out(self, src: Agent, name: str, d: Draft) -> list[Event]:
        """The copies of a message written to topics/NAME; NotFound if no
        destination takes it (nothing of the write is sent then)."""
        topic = self.topics.get(name)
        if topic is None:
            raise NotFound(f"no topic {name!r}")
        priority = d.priority or src.priority
        env = routing.envelope(src.name, name, priority, d.body, d.reply_to)
        targets = topic.destinations(env)
        if not targets:
            raise NotFound(f"topics/{name}: no destination takes this message")
        for to in targets:
            if to not in self.agents:
                raise NotFound(f"topics/{name}: no agent {to!r}")
        return [
            events.message(new_id(), src.name, to, priority, d.body, d.reply_to, topic=name)
            for to in targets
        ]

    def _held(self, agent: Agent, reply_to: str | None, held: tuple[str, ...]) -> Message:
        if reply_to is not None:
            msg = agent.inflight.get(reply_to)
            if msg is None:
                raise BadInput(f"{reply_to} is not a message {agent.name} holds in flight")
            return msg
        if not agent.inflight:
            raise BadInput(f"no 'to' and {agent.name} holds no message in flight to reply to")
        if len(agent.inflight) > 1:
            if len(held) == 1 and held[0] in agent.inflight:
                return agent.inflight[held[0]]
            raise BadInput(
                f"{agent.name} holds several messages in flight: give 'to' or 'reply_to'"
            )
        return next(iter(agent.inflight.values()))

    def full(self, planned: list[Event]) -> Agent | None:
        """The first recipient without room for its share of `planned`, if any
        (a message held at the gate takes no room)."""
        counts: dict[str, int] = {}
        for ev in planned:
            if ev["type"] == "held":
                counts[ev["agent"]] -= 1
                continue
            counts[ev["to"]] = counts.get(ev["to"], 0) + 1
        for to, n in counts.items():
            agent = self.agents[to]
            if agent.queued + n > self.config.max_queue:
                return agent
        return None

    def deliver(self, messages: list[Event]) -> None:
        """Log message events (room already checked)."""
        self.record(messages)

    def take(
        self, name: str, pid: int = 0, instance: int | None = None, now: float | None = None
    ) -> Message | None:
        """Put the next message of NAME's inbox in flight and return it, or None
        if the inbox is empty. Which one is next depends on the time (aging, nack
        delays): the `deliver` event names it, so a replay takes the same one. It
        carries the reader (`pid`, `instance`) and, with explicit acks, the
        absolute `deadline` of ack_wait."""
        agent = self.agents[name]
        now = time.time() if now is None else now
        msg = flows.due(agent, now) or agent.inbox.peek(now)
        if msg is None:
            return None
        ev = events.deliver(name, msg.id, msg.delivered + 1)
        ev["pid"] = pid
        ev["instance"] = instance
        ac = agent.config
        if ac is not None and ac.ack == "explicit" and ac.ack_wait:
            ev["deadline"] = round(now + ac.ack_wait, 6)
        self.record([ev])
        return msg

    def take_id(self, name: str, msg_id: str, who: str) -> Message:
        """Take one queued message of NAME's inbox, whichever its place: delivered and
        acknowledged at once (the operator's ctl `take ID`, used by `outheisfs ask`)."""
        self.agent(name)
        msg = self.messages.get(msg_id)
        if msg is None or msg.to != name or msg.state in (INFLIGHT, HELD):
            raise NotFound(f"take: {msg_id} is not queued for {name}")
        self.record(
            [events.deliver(name, msg_id, msg.delivered + 1), events.ack(name, msg_id, who)]
        )
        return msg

    def ack(self, msg: Message, who: str) -> None:
        if self.messages.get(msg.id) is msg and msg.state == INFLIGHT:
            self.record([events.ack(msg.to, msg.id, who)])

    def ack_all(self, name: str, who: str, msg_id: str | None = None) -> int:
        agent = self.agent(name)
        if msg_id is not None:
            if msg_id not in agent.inflight:
                raise BadInput(f"{msg_id} is not in flight for {name}")
            ids = [msg_id]
        else:
            ids = list(agent.inflight)
        self.record(events.ack(name, i, who) for i in ids)
        return len(ids)

    def retry(
        self, msg: Message, reason: str, counted: bool = True, attempt: int | None = None
    ) -> None:
        """The holder of `msg` died abnormally: queue it again, or bury it. Not
        `counted` (the supervisor stopped the reader): queued again, no attempt spent."""
        if self.messages.get(msg.id) is not msg or msg.state != INFLIGHT:
            return
        if attempt is not None and msg.delivered != attempt:
            return  # delivered again since: another reader holds it
        if not counted:
            ev = events.redeliver(msg.to, msg.id, msg.delivered, reason)
            ev["counted"] = False
            self.record([ev])
        elif msg.delivered >= self.config.max_attempts:
            self.record([events.dead(msg.to, msg.id, msg.delivered, reason)])
        else:
            self.record([events.redeliver(msg.to, msg.id, msg.delivered + 1, reason)])

    def requeue_inflight(self) -> None:
        """After replay: what was in flight when the server stopped is delivered again."""
        for agent in list(self.agents.values()):
            explicit = agent.config is not None and agent.config.ack == "explicit"
            for msg in list(agent.inflight.values()):
                # Explicit acks: the holder did not fail, the server stopped.
                self.retry(msg, "server restarted while in flight", counted=not explicit)

    def mkdir(self, name: str, who: str) -> Agent | None:
        """Create an agent; it, or None while its event is on its way (a cluster)."""
        if not valid_name(name):
            raise BadInput(f"agent name {name!r} must match [a-z0-9][a-z0-9_.-]{{0,63}}")
        if name in self.agents:
            raise Exists(f"agent {name!r} exists")
        self.record([events.agent("create", name, who)])
        return self.agents.get(name)

    def rmdir(self, name: str, who: str) -> None:
        agent = self.agent(name)
        if name == OPERATOR:
            raise Busy("the operator's mailbox 'user' cannot be removed")
        pending = agent.queued + len(agent.inflight) + len(agent.delayed) + len(agent.held)
        if pending:
            raise NotEmpty(f"agent {name!r} has {pending} pending messages")
        self.record([events.agent("remove", name, who)])
