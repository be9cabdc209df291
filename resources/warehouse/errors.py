"""The warehouse's one failure family."""


class WarehouseError(RuntimeError):
    """The warehouse cannot be opened, reached or locked; the message names it and what to do."""
