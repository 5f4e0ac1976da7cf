"""The errors of pear-data: one family for what a user can fix, one class for a row that is rejected.

Two kinds of failure, handled differently (docs/design.md, "Errors and exit codes"):

- `PearDataError` and its subclasses: the run as a whole cannot go on because of
  something the user gave (a flag, a file, a model, the output directory). The
  message names the flag, file, row or column and says what to do. The CLI
  prints it without a traceback and exits with code 2. Nothing is lost: a
  run that stops this way either wrote nothing or left an output that
  `--resume` continues.
- `RowError`: one input row cannot be processed. It is not raised to the
  user: the row goes to `rejects.parquet` with the reason, and the run goes on.

Anything else that escapes is a bug in pear-data (exit code 1, traceback).
"""

from __future__ import annotations

import errno

# OSErrors of the environment, not of pear-data: the user can fix them (exit 2; the CLI names the path).
USER_OS_ERRORS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM, errno.EFBIG,
                            errno.ENAMETOOLONG, errno.EISDIR, errno.ENOTDIR, errno.ELOOP})


class PearDataError(Exception):
    """Something the user can fix stopped the run (CLI exit code 2, no traceback)."""


class ConfigError(PearDataError, ValueError):
    """An option that is wrong or does not go with another (`pear_data.config`: the message names the flag as the
    command line spells it)."""


class UsageError(PearDataError):
    """Flags that are wrong or do not go together (`--resume --overwrite`, `--alignment direct` with
    another tokenizer, ...)."""


class InputError(PearDataError):
    """An input as a whole cannot be read: the corpus, a scored dataset, a manifest (names the file)."""


class UnfinishedOutputError(InputError):
    """A pear-data output that its run has not finished, or that another process is writing now: a reader of
    outputs (`reweight`, `stats`, `push`, ...) refuses it, naming it and saying how to finish it."""


class CorpusError(InputError):
    """The corpus cannot be read or its row shape cannot be understood."""


class ModelSpecError(PearDataError, ValueError):
    """A model spec that cannot be resolved or loaded; the message says what to do."""


class OutputError(PearDataError):
    """The output directory cannot be written as asked (not ours, exists, locked, modified by hand)."""


class OutputExistsError(OutputError):
    """OUT is not empty and neither --resume nor --overwrite applies (or OUT is not a pear-data output)."""


class OutputLockedError(OutputError):
    """Another pear-data process is writing OUT (it holds OUT/.pear/lock)."""


class ResumeMismatchError(OutputError):
    """--resume on an OUT written with a different input fingerprint or different flags."""


class TrainingError(PearDataError, ValueError):
    """A trainer option or a training dataset that cannot train as asked (names the option or column and what
    to do); raised when the trainer is built, before any step."""


class PushError(PearDataError):
    """The output directory cannot be pushed (unfinished, incomplete, invalid repo id, the Hub refused)."""


class OverflowAbort(PearDataError):
    """A row is longer than --max-length and --on-overflow is "error"."""

    def __init__(self, n_tokens: int, max_length: int) -> None:
        super().__init__(
            f"over max length: {n_tokens} tokens > {max_length} "
            "(raise --max-length, or pass --on-overflow truncate or --on-overflow skip)"
        )
        self.n_tokens = n_tokens
        self.max_length = max_length


class RowError(Exception):
    """One row cannot be processed; `reason` goes to the `reject_reason` column of rejects.parquet."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason
