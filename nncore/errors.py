"""Exception types shared by nncore modules."""


class ConfigError(ValueError):
    """A model or solver configuration is invalid; the message names the field."""


class DataError(ValueError):
    """A dataset name is unknown or a data file is malformed; the message names it."""
