"""The cluster floor: from a gossip event to a worker start.

- `view`: the one read model of the cluster (gossip events -> NodeView, replicas, status);
- `payload`: what one node gossips about itself, and its parser;
- `state`: the replicated state machine the Raft log drives;
- `controller`, `reconciler`: pure steps (view, state, now) -> actions;
- `runner`: the one place that does their I/O (proposals, engine starts and stops);
- `lifecycle`: the instance states and their allowed transitions;
- `node`: wiring only.
"""
