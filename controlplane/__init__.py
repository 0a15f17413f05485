"""The control plane: the only writer of loraplane's state."""
