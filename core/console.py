"""The rich console every CLI prints through: fitted to the terminal a person reads, never
wrapped or cut when the output goes to a pipe, a file or a test."""

from __future__ import annotations

from rich.console import Console, ConsoleDimensions

# Wide enough that no line the CLIs print (tables, paths, command lines) is wrapped or cut,
# small enough that rich's layout stays cheap.
PIPE_WIDTH = 4096


class CliConsole(Console):
    """A rich Console whose width is the terminal's only when it writes to a terminal.

    Rich otherwise takes the width of whatever terminal started the process (or `COLUMNS`)
    even when stdout is a pipe, so `fieldline certs list | grep pump-12` would miss a row
    whose id the table cut to "pump-…" in an 80-column window.
    """

    @property
    def size(self) -> ConsoleDimensions:
        """The terminal's size on a terminal; `PIPE_WIDTH` columns anywhere else."""
        dims = super().size
        if self._writes_to_tty():
            return dims
        return ConsoleDimensions(PIPE_WIDTH, dims.height)

    @size.setter
    def size(self, new_size: tuple[int, int]) -> None:
        # Rich's own setter; like COLUMNS, the size set applies on a terminal only.
        self.width, self.height = new_size

    def _writes_to_tty(self) -> bool:
        # isatty(), not is_terminal: FORCE_COLOR asks for colour, not for cut lines in a pipe.
        isatty = getattr(self.file, "isatty", None)
        try:
            return bool(isatty and isatty())
        except ValueError:  # a closed file, e.g. at the end of a test run
            return False


def cli_console(*, stderr: bool = False) -> CliConsole:
    """The console a CLI module prints through (stdout, or stderr with `stderr=True`)."""
    return CliConsole(stderr=stderr)
