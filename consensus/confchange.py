"""Single-server membership changes (dissertation 4.1) as a pure function on ConfState."""

from __future__ import annotations

from .types import ConfState, ProposalRejected


def changed_conf(conf: ConfState, op: str, node: str, voter: bool = True) -> ConfState:
    """The configuration after one change: op "add" (voter=False adds a learner; voter=True on
    a learner promotes it), "promote" (learner to voter) or "remove" (voter or learner)."""
    voters, learners = list(conf.voters), list(conf.learners)
    if op == "add" and not voter:
        if node in voters or node in learners:
            raise ProposalRejected(f"{node} is already a member")
        learners.append(node)
    elif op in ("add", "promote"):
        if node in voters:
            raise ProposalRejected(f"{node} is already a voter")
        if node in learners:
            learners.remove(node)
        elif op == "promote":
            raise ProposalRejected(f"{node} is not a learner")
        voters.append(node)
    elif op == "remove":
        if node in voters:
            if len(voters) == 1:
                raise ProposalRejected("cannot remove the last voter")
            voters.remove(node)
        elif node in learners:
            learners.remove(node)
        else:
            raise ProposalRejected(f"{node} is not a member")
    else:
        raise ValueError(f"unknown conf change op {op!r}")
    return ConfState(tuple(voters), tuple(learners))
