"""The ``perceive`` command's subcommands, one module each: a plain ``cmd_*`` function of the parsed
arguments and an ``add_parser`` that registers it. ``perceive.cli`` assembles them; they never import it."""


class CliError(Exception):
    """A user-facing failure: printed as one line, exit status 1, no traceback."""
