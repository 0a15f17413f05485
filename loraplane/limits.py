"""What loraplane accepts, defined once: names, adapter sizes, tensor dtypes."""

from __future__ import annotations

import re

# An adapter, base model or worker name: a letter or digit, then up to 63 of these.
NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")

# The largest adapter file accepted, unless LORAPLANE_MAX_ADAPTER_BYTES says otherwise.
MAX_ADAPTER_BYTES = 500 * 1000 * 1000

# The safetensors dtypes an adapter's tensors may have, and their size in bytes.
DTYPE_BYTES = {"F16": 2, "BF16": 2, "F32": 4}
