"""The ``perceive`` command run in the test's own process: what a subprocess gives (its exit status, stdout and stderr,
a traceback for an uncaught exception), without importing torch and transformers again for each call (about 9 s a
call on 2 cores)."""

from __future__ import annotations

import contextlib
import io
import traceback
from dataclasses import dataclass


@dataclass
class Ran:
    returncode: int
    stdout: str
    stderr: str


def run_cli(*args) -> Ran:
    from perceive.cli import main

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = main([str(a) for a in args])
        except SystemExit as e:  # argparse's usage errors
            code = e.code if isinstance(e.code, int) else 1
        except Exception:  # as the interpreter reports it: a traceback, status 1
            traceback.print_exc()
            code = 1
    return Ran(code, out.getvalue(), err.getvalue())
