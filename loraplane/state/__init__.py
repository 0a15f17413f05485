"""loraplane's shared state in Redis, defined once and imported by every component.

- `keys`: every key and channel, with its type and its one writer (`keys.SCHEMA`).
- `records`: the typed records stored under those keys, with their codecs.
- `messages`: what is published on the channels, with encode/decode.
- `queries`: the reads the data plane and the control plane share, and the data plane's
  one write (adapter use).

Nothing outside this package builds a key, names a channel or decodes a record.
"""
