"""blit's network transport: the sans-IO protocol and its I/O shells.

    protocol.py  messages, CBOR codec with validation, session states, data frames (no I/O)
    control.py   HTTP/2 (h2 over trio) for the daemon and the client; TLS pinning on connect
    data.py      one-time stream tokens, raw TCP data streams (worker threads), HTTP/2 fallback
    tls.py       the daemon's self-signed certificate; the client's known-hosts pins
    client.py    a client session: requests, transfers, their data streams
    tree.py      tree transfers: source manifests, destination planning and landing
    remote.py    remote copy/mirror with rsync's trailing-slash rules (called by api.py)

Nothing is imported here, so that `import blit.transport.protocol` stays light.
"""
