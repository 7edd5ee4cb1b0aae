"""Exception types, in a module that imports nothing (so `import ternet` stays instant)."""


class ModelFormatError(ValueError):
    """A model file is missing, unreadable or inconsistent; the message names file and place."""
