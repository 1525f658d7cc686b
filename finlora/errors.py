"""The one error hierarchy. Library code raises these; only `finlora.cli` turns them
into an `error: ...` line and an exit code, so any caller can catch them with
`except FinLoRAError` (or `except Exception`) and carry on.

Messages name the file, line and field, and carry no `error: ` prefix."""


class FinLoRAError(Exception):
    """A problem the user must fix."""

    exit_code = 1


class RecipeError(FinLoRAError):
    """A recipe (or the matrix) is missing, malformed or refused by Axolotl."""


class CheckFailed(RecipeError):
    """`make check` found errors; `make train` starts nothing (exit 2, as a usage error)."""

    exit_code = 2


class DataError(FinLoRAError):
    """Input data is not fit to write or train on; the message lists every problem."""


class SourceError(DataError):
    """A data source cannot be read at all (missing file, missing column, no hub)."""


class ModelError(FinLoRAError):
    """A base model or adapter folder is missing or does not match."""


class EvalError(FinLoRAError):
    """`make eval` cannot score what it was given."""


class InferError(FinLoRAError):
    """`make infer` cannot answer the request as given."""


class MergeError(FinLoRAError):
    """`make merge` refuses the adapter or the output folder."""


class SmokeError(FinLoRAError):
    """A smoke run of a recipe did not train, merge or score as it must."""


class LaunchError(FinLoRAError):
    """`make train` cannot start the launch it was asked for (GPUS, NODES, DeepSpeed)."""


class SetupError(FinLoRAError):
    """`make setup GPU=1` would not install as pinned (its pip lines, pip's resolver)."""


class RefusedError(FinLoRAError):
    """The command would delete or replace something this project did not write (an
    adapter, a base model, a checkpoint, a user's file); nothing was touched."""
