"""The one error type for bad input: the CLI turns it into a one-line message and exit code 2."""


class InputError(Exception):
    """Bad user input (config, data, model reference, CLI usage). The message names the culprit."""

    exit_code = 2
