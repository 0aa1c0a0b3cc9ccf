"""One exception type for bad user input: the CLI prints its message on one line and exits 2."""


class QNNError(Exception):
    """Bad input (file, shape, option); the message says what was wrong and what is allowed."""
