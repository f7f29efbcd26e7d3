"""Errors a user can act on. The CLI shows their message as one line, never a traceback."""


class EngineError(RuntimeError):
    """A problem with the model or the config that the user can fix; the message says how."""


class ModelTooLargeError(EngineError):
    """The model's data (params, masters, moments) cannot fit the device + host budgets."""
