"""Exception types shared by nncore modules."""


class ConfigError(ValueError):
    """A configuration (an experiment config, a model or solver table) is invalid; the message names the key."""


class DataError(ValueError):
    """A dataset name is unknown or a data file is malformed; the message names it."""
