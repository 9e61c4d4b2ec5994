"""One base class for every mistake a user can fix: `LorakitError`.

The CLI catches this one class, prints its message and exits with status 2; anything else is a bug and
keeps its traceback. Each subclass says where the problem is (a config key, a data file and line, a model
directory, an adapter file) and what to do. The ValueError/RuntimeError bases keep `except ValueError`
callers of the Python API working.
"""

from __future__ import annotations


class LorakitError(Exception):
    """A problem the user can fix; the message names the file/key/flag and says what to do."""


class ConfigError(LorakitError, ValueError):
    """A config problem a user can fix; the message lists every problem found."""

    def __init__(self, problems: list[str] | str, source: str | None = None):
        self.problems = [problems] if isinstance(problems, str) else list(problems)
        where = f" in {source}" if source else ""
        lines = "\n".join(f"  - {p}" for p in self.problems)
        super().__init__(f"{len(self.problems)} problem(s){where}:\n{lines}")


class DataError(LorakitError, ValueError):
    """Bad input data; the message names the file, line or field and says what to do."""


class ModelLoadError(LorakitError, ValueError):
    """The base model or tokenizer could not be loaded; the message says why and what to do."""


class AdapterError(LorakitError, ValueError):
    """An adapter that cannot be loaded or saved as asked; the message says why and what to do."""


class AdviceError(LorakitError, ValueError):
    """The advisor cannot answer; the message says what to pass instead."""


class TrainingError(LorakitError, RuntimeError):
    """The run stopped for a reason the user must act on; the message says what to do."""


class OutputError(LorakitError, OSError):
    """An output path cannot be written (exists, read-only, full disk, locked); names the path and the way out."""


class ExportError(LorakitError, ValueError):
    """An export that cannot be done as asked; the message says why and what to do."""
