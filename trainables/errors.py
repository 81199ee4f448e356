"""The one error type for bad input: the CLI turns it into a one-line message and exit code 2."""


class InputError(Exception):
    """Bad user input (config, data, model reference, CLI usage). The message names the culprit."""

    exit_code = 2


class OutOfGPUMemory(RuntimeError):
    """A trial ran out of GPU memory. Its message (the trial's reason) starts with :data:`OOM_REASON`
    and names the settings; the trial is not retried, since the same settings would run out again."""


OOM_REASON = "out of GPU memory"
