"""Errors of the edge agent: each message says what was wrong and what to do."""


class EdgeError(Exception):
    """Base: the edge agent could not be configured, started or run."""


class OutboxError(EdgeError):
    """The outbox file cannot be opened or written (corrupt, not SQLite, disk full)."""


class ManifestError(EdgeError):
    """The manifest is invalid; every problem names the file and the TOML key path."""

    def __init__(self, source: str, problems: list[tuple[str, str]]) -> None:
        self.source = source
        # (key path such as `routes[2].to`, what is wrong and what would be right)
        self.problems = problems
        lines = [f"{path}: {text}" if path else text for path, text in problems]
        if len(lines) == 1:
            message = f"{source}: {lines[0]}"
        else:
            message = f"{source}: {len(lines)} problems:\n  " + "\n  ".join(lines)
        super().__init__(message)


class RuleError(EdgeError):
    """A rule was asked for something its manifest entry does not have (an event, a command)."""
