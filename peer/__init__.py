"""Peer discovery, membership and gossip (issue 4), and request forwarding.

Import from the modules (kept light here so `python -m peer` and the pure core stay cheap):
    from peer.config import GossipConfig
    from peer.gossip import Gossip
    from peer.discovery import Discovery
    from peer.crypto import Keyring
    from peer.secret import load_or_create_secret, cluster_id, encode_join_token, parse_join_token
    from peer.messages import MemberView, MemberEvent
See docs/gossip.md.
"""
