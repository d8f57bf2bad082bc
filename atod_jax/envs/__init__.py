"""Multi-turn environments: the batched text protocol and the on-device household family."""
