"""One error type for everything wrong with a trace or its inputs."""


class TraceError(ValueError):
    """A malformed trace, importer input or shape; the message names file, row and field."""
