"""Domain errors. The service maps each class to one HTTP status in one place (app.main)."""


class SwitchBankError(Exception):
    """Base class of every error switchbank raises on purpose."""


class InvalidInput(SwitchBankError):
    """A caller passed something malformed (bad weights, bad option, bad image)."""


class NotFound(SwitchBankError):
    """A named switch does not exist."""


class Conflict(SwitchBankError):
    """A different switch already exists under that name."""


class Incompatible(SwitchBankError):
    """Two things that must match do not: tensor names or shapes, backbone or router fingerprint."""


class CorruptSwitch(SwitchBankError):
    """A switch file is truncated, corrupted, tampered with, or not a switch file at all."""


class CheckpointError(SwitchBankError):
    """A checkpoint could not be read as a state dict of tensors."""


class Unavailable(SwitchBankError):
    """Something the server holds cannot be used right now (a switch file that cannot be read)."""


class SwitchChanged(Unavailable):
    """A switch's file was replaced or removed since the switch was listed (another process changed
    the bank): the bank has a newer state to follow."""
