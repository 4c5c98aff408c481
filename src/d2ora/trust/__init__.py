"""Trust building blocks: peer identities (Ed25519) and the roster of who may take part."""
