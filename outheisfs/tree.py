"""The file tree, declared as one table, as Plan 9's `dirtab` declares a server's.

Every node is a row: its name, its kind, its mode, what it can ever allow to an
agent (its own file, another agent's), and its content: how a read and a write
on it are served. The root's rows and each agent's rows are fixed; agents come
and go, and each gets a block of inode numbers that is never reused within a
mount, so the kernel never confuses an old agent's files with a new one's.

Adding a file to every agent's folder is one row in AGENT_ROWS; a new kind of
content is one more `Read`/`Write` member and its function in `openfile`.
"""

from __future__ import annotations

import stat
from dataclasses import dataclass
from enum import Enum

ROOT_INODE = 1


class Kind(Enum):
    ROOT = "root"
    AGENTS = "agents"
    VAULT = "vault"
    AGENT = "agent"  # agents/NAME/
    ROOT_CTL = "root ctl"
    ROOT_LOG = "root log"
    INBOX = "inbox"
    OUTBOX = "outbox"
    CTL = "ctl"
    LOG = "log"
    DEAD = "dead"
    ERRORS = "errors"
    OUTPUT = "output"
    TOPICS = "topics"  # topics/
    TOPIC = "topic"  # topics/NAME
    APPROVALS = "approvals"


class Read(Enum):
    """What a read of the file gives."""

    NONE = "none"  # a folder
    QUEUE = "queue"  # the next message of the agent's inbox, one per read
    STREAM = "stream"  # a growing stream of the event log, at the file offset
    STATUS = "status"  # a status text, as of open
    OUTPUT = "output"  # what the agent's processes print, at the file offset


class Write(Enum):
    """What a write to the file does."""

    NONE = "none"
    SEND = "send"  # lines are messages, sent through the file
    COMMAND = "command"  # lines are ctl commands


@dataclass(frozen=True, slots=True)
class Row:
    name: str
    kind: Kind
    mode: int  # permission bits; S_IFDIR or S_IFREG is added from `is_dir`
    own: str = ""  # what an agent may ever do with its own file of this row
    other: str = ""  # ... with another agent's (or the root's) file of this row
    read: Read = Read.NONE
    write: Write = Write.NONE
    stream: str | None = None  # Read.STREAM: "{agent}.log", or None for the main log
    is_dir: bool = False
    # Open files of this kind bypass the page cache: their content changes
    # behind the kernel's back (growing logs, status) or is a stream (inbox).
    direct_io: bool = True

    @property
    def growing(self) -> bool:
        """Its size grows (and so does its mtime)."""
        return self.read in (Read.STREAM, Read.OUTPUT)

    def stream_of(self, agent: str | None) -> str | None:
        """The event-log stream this row reads, for `agent`'s file."""
        return None if self.stream is None else self.stream.format(agent=agent)

    @property
    def readable(self) -> bool:
        return bool(self.mode & 0o444)

    @property
    def writable(self) -> bool:
        return bool(self.mode & 0o222)

    @property
    def st_mode(self) -> int:
        return (stat.S_IFDIR if self.is_dir else stat.S_IFREG) | self.mode


ROOT = Row("", Kind.ROOT, 0o755, is_dir=True)
ROOT_ROWS = (
    # name, kind, mode, own, other, read, write, stream
    Row("ctl", Kind.ROOT_CTL, 0o660, "", "r", Read.STATUS, Write.COMMAND),  # operator: reload
    Row("log", Kind.ROOT_LOG, 0o440, "", "r", Read.STREAM),
    Row("agents", Kind.AGENTS, 0o770, is_dir=True),
    Row("vault", Kind.VAULT, 0o770, is_dir=True),
    Row("topics", Kind.TOPICS, 0o550, is_dir=True),
    # the messages held for approval, the operator's only: read as `approvals` says;
    # its size is the journal's (the `approvals` stream), which only grows
    Row("approvals", Kind.APPROVALS, 0o440, "", "", Read.STREAM, stream="approvals"),
)
# topics/NAME: write-only, a message written there fans out (the `send` row of a topic)
TOPIC = Row("", Kind.TOPIC, 0o220, "", "w", Read.NONE, Write.SEND)
TOPIC_FIRST = 1 << 39  # topics' inodes: above every agent's block, below the vault's
AGENT = Row("", Kind.AGENT, 0o550, is_dir=True)
AGENT_ROWS = (
    # inbox: offsets mean nothing to a queue, reads take the next message wherever
    # the file offset is; lseek still succeeds (GNU head and bash seek by 0 at the
    # end of a line, and a failing lseek makes head complain).
    # name, kind, mode, own, other, read, write, stream
    Row("inbox", Kind.INBOX, 0o660, "rw", "w", Read.QUEUE, Write.SEND),
    Row("outbox", Kind.OUTBOX, 0o660, "rw", "r", Read.STREAM, Write.SEND, "{agent}.outbox"),
    Row("ctl", Kind.CTL, 0o660, "rw", "r", Read.STATUS, Write.COMMAND),
    Row("log", Kind.LOG, 0o440, "r", "r", Read.STREAM, Write.NONE, "{agent}.log"),
    # dead letters as of open, JSON lines; the refusals of its processes, JSON lines
    Row("dead", Kind.DEAD, 0o440, "r", "r", Read.STATUS),
    Row("errors", Kind.ERRORS, 0o440, "r", "r", Read.STREAM, Write.NONE, "{agent}.errors"),
    Row("output", Kind.OUTPUT, 0o440, "r", "r", Read.OUTPUT),
)

_FIXED = {ROOT_INODE: ROOT} | {ROOT_INODE + 1 + i: row for i, row in enumerate(ROOT_ROWS)}
_ROOT_BY_NAME = {row.name: ROOT_INODE + 1 + i for i, row in enumerate(ROOT_ROWS)}
_AGENT_BY_NAME = {row.name: i + 1 for i, row in enumerate(AGENT_ROWS)}
AGENTS_INODE = _ROOT_BY_NAME["agents"]
VAULT_INODE = _ROOT_BY_NAME["vault"]
TOPICS_INODE = _ROOT_BY_NAME["topics"]
BLOCK = 8  # inodes per agent: the directory, then its rows
FIRST_AGENT = 16


@dataclass(frozen=True, slots=True)
class Node:
    inode: int
    row: Row
    agent: str | None = None
    topic: str | None = None  # a topic's file: its name

    @property
    def path(self) -> str:
        """Its path in the mount, as views and events name it."""
        kind = self.row.kind
        if kind is Kind.ROOT:
            return "/"
        if kind is Kind.TOPIC:
            return f"/topics/{self.topic}"
        if self.agent is None:
            return "/" + self.row.name
        if kind is Kind.AGENT:
            return f"/agents/{self.agent}"
        return f"/agents/{self.agent}/{self.row.name}"


class Tree:
    """Maps inode numbers to nodes and names to inode numbers."""

    def __init__(self) -> None:
        self._slots: dict[str, int] = {}  # agent name -> block number
        self._names: dict[int, str] = {}  # block number -> agent name
        self._next = 0
        self.topics: list[str] = []  # the config's, in order; inode TOPIC_FIRST + index
        self._shown: set[str] = set()  # the topics of the config in force

    def add_agent(self, name: str) -> int:
        block = self._slots.get(name)
        if block is None:
            block = self._next
            self._next += 1
            self._slots[name] = block
            self._names[block] = name
        return FIRST_AGENT + block * BLOCK

    def remove_agent(self, name: str) -> None:
        block = self._slots.pop(name, None)
        if block is not None:
            del self._names[block]

    def agent_inode(self, name: str) -> int | None:
        block = self._slots.get(name)
        return None if block is None else FIRST_AGENT + block * BLOCK

    def set_topics(self, names: list[str]) -> None:
        """The topics shown: a topic keeps its inode, new ones get the next."""
        self.topics += [n for n in names if n not in self.topics]
        self._shown = set(names)

    def node(self, inode: int) -> Node | None:
        row = _FIXED.get(inode)
        if row is not None:
            return Node(inode, row)
        if TOPIC_FIRST <= inode < TOPIC_FIRST + len(self.topics):
            topic = self.topics[inode - TOPIC_FIRST]
            return Node(inode, TOPIC, topic=topic) if topic in self._shown else None
        if inode < FIRST_AGENT:
            return None
        block, index = divmod(inode - FIRST_AGENT, BLOCK)
        name = self._names.get(block)
        if name is None or index > len(AGENT_ROWS):
            return None
        return Node(inode, AGENT if index == 0 else AGENT_ROWS[index - 1], name)

    def lookup(self, parent: Node, name: str) -> int | None:
        kind = parent.row.kind
        if kind is Kind.ROOT:
            return _ROOT_BY_NAME.get(name)
        if kind is Kind.AGENTS:
            return self.agent_inode(name)
        if kind is Kind.TOPICS:
            return TOPIC_FIRST + self.topics.index(name) if name in self._shown else None
        if kind is Kind.AGENT and parent.agent is not None:
            index = _AGENT_BY_NAME.get(name)
            return None if index is None else parent.inode + index
        return None

    def children(self, parent: Node, agents: list[str]) -> list[tuple[str, int]]:
        kind = parent.row.kind
        if kind is Kind.ROOT:
            return sorted(_ROOT_BY_NAME.items(), key=lambda kv: kv[1])
        if kind is Kind.AGENTS:
            return [(a, self.add_agent(a)) for a in agents]
        if kind is Kind.TOPICS:
            return [(t, TOPIC_FIRST + i) for i, t in enumerate(self.topics) if t in self._shown]
        if kind is Kind.AGENT:
            return [(row.name, parent.inode + i + 1) for i, row in enumerate(AGENT_ROWS)]
        return []
