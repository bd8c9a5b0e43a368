"""The cluster floor: from a gossip event to a worker start, one room per job.

- `view`: the one read model of the cluster (gossip events -> NodeView; replicas_of,
  availability_of, members and other clusters by cluster id);
- `payload`: what one node gossips about itself, and its parser;
- `status`: the /cluster/status document;
- `state`: the replicated state machine the Raft log drives;
- `controller`, `reconciler`: pure steps (view, state, now) -> actions;
- `runner`: the one place that does their I/O (proposals, voter changes, engine starts and
  stops), woken by gossip events and Raft applies;
- `raft`: the proposer, the API's view, and when this peer may act on its state;
- `membership_policy`: voters, learners and bootstrap;
- `keys`: the replicated API keys and proposal ids (read by access/);
- `errors`: the cluster's own ServiceError (no leader, not joined);
- `instances`: the engines this peer runs;
- `node`: one peer's cluster parts together (server.py builds it, with an engine factory).
"""
