"""Authenticated, encrypted peer-to-peer links between organisations: gRPC over mutual TLS 1.3,
pinned to the roster.

One module per job: ``certs`` (identity and link certificates, and why not Ed25519 in TLS),
``tls`` (gRPC credentials pinned to the roster, caller -> roster id), ``frame`` (the 40-byte
message header), ``service`` (the server's one method and its checks), ``channels`` (a pinned
channel to one neighbour, retried until it is up), ``inbox`` (arrivals and deadlines), ``link``
(``PeerLink``: all of it for one peer).

Nothing is imported here, so ``d2ora keygen`` (which needs only ``certs``) does not load gRPC.
"""
