"""Exception types, in a module that imports nothing (so `import ternet` stays instant)."""


class ModelFormatError(ValueError):
    """A model file is missing, unreadable or inconsistent; the message names file and place."""


class SettingError(ValueError):
    """An environment variable or argument has a value ternet cannot use; the message names the
    setting and the value (the CLI exits with status 2, as for a bad option)."""
