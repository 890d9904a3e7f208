"""Errors that several rooms raise (a leaf module: it imports nothing of vidtrain).

Each is a ValueError, so the console scripts print its one line and exit 2.
"""


class CheckpointError(ValueError):
    """A checkpoint that cannot be written or resumed; the message names the step and path."""


class NonFiniteError(ValueError):
    """Non-finite loss, gradients or weights: the run stops before anything non-finite is kept."""
