"""A peer's Raft id: distinct from its node name and bound to its data dir's Raft state.

A voter that loses its Raft state forgets the votes it cast; if it came back under the same
Raft id it could vote twice in one term and elect two leaders. So the Raft id of a peer is
`NAME@MEMBER`, where MEMBER is `FileStorage.member_id` (16 hex digits created with the raft
directory): a wiped or replaced raft directory is a new Raft member, which the leader adds
as a learner and promotes once caught up, after retiring the old id
(`membership_policy.next_conf_change`). The name part keeps logs and status readable and
lets a peer find a member's address from the node registry when gossip has not heard it.

The id is written once, to `raft/raft_id`, and read back on every start, so it is whatever
the directory voted under (a later `--name` change does not change it). A raft directory
written before member ids existed (it holds Raft state but no `raft_id` file) keeps the
node name as its Raft id: that is the identity it voted under, and changing it would let it
vote again in terms it already voted in.

`node_of` and `is_member_id` are pure; `raft_identity` does the file I/O.
"""

from __future__ import annotations

import os
from pathlib import Path

from consensus import StorageError

RAFT_ID_FILE = "raft_id"
SEPARATOR = "@"
_HEX = frozenset("0123456789abcdef")


def is_member_id(text: str) -> bool:
    return len(text) == 16 and set(text) <= _HEX


def raft_id_for(name: str, member_id: str) -> str:
    return f"{name}{SEPARATOR}{member_id}"


def node_of(raft_id: str) -> str:
    """The node name in a Raft id: `NAME@MEMBER` -> NAME. An id without a member part (a
    raft directory from before member ids) is the node name itself."""
    name, sep, member = raft_id.rpartition(SEPARATOR)
    return name if sep and name and is_member_id(member) else raft_id


class RaftIdError(StorageError):
    """The raft directory's `raft_id` file does not read as an id."""


def raft_identity(raft_dir: Path, name: str, member_id: str, has_state: bool) -> str:
    """This peer's Raft id for the raft directory `raft_dir` (already opened by FileStorage,
    which created `member_id`): the one recorded there; else, for a directory with Raft
    state but no record (written before member ids), the node name it voted under; else
    (a new or wiped directory) `NAME@MEMBER`. A new decision is written (fsynced) before
    Raft starts, so it holds for the life of the directory."""
    path = Path(raft_dir) / RAFT_ID_FILE
    if path.exists():
        raft_id = path.read_text().strip()
        if not raft_id or any(c.isspace() for c in raft_id):
            raise RaftIdError(
                f"{path} does not hold a Raft id ({raft_id[:40]!r}). If this raft directory "
                "is damaged, delete the whole directory and start again: the peer rejoins "
                "as a new member"
            )
        return raft_id
    raft_id = name if has_state else raft_id_for(name, member_id)
    tmp = path.with_suffix(".tmp")
    with open(tmp, "w") as f:
        f.write(raft_id + "\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fd = os.open(raft_dir, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    return raft_id
