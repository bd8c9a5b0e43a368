"""Raft consensus for AIvailable: a pure core (core.py), durable storage and an asyncio driver."""

from .core import CANDIDATE, FOLLOWER, LEADER, PRE_CANDIDATE, RaftNode
from .log import LogSafetyError
from .storage import FileStorage, MemoryStorage
from .types import (
    ConfState,
    Entry,
    HardState,
    Message,
    NotLeader,
    ProposalRejected,
    ReadState,
    Ready,
    Snapshot,
)
from .wal import StorageCorrupt, StorageError, StorageFull

__all__ = [
    "CANDIDATE",
    "FOLLOWER",
    "LEADER",
    "PRE_CANDIDATE",
    "ConfState",
    "Entry",
    "FileStorage",
    "HardState",
    "LogSafetyError",
    "MemoryStorage",
    "Message",
    "NotLeader",
    "ProposalRejected",
    "RaftNode",
    "Ready",
    "ReadState",
    "Snapshot",
    "StorageCorrupt",
    "StorageError",
    "StorageFull",
]
