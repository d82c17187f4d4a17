"""The one exception type of the data tools, so CLIs can print it without a traceback."""

from hybrid_megatron.errors import InputError


class DataToolsError(InputError):
    """A user-facing error about inputs, tokenizers or datasets.

    The message always names the offending file (and line, where there is one), so the CLIs
    print it as-is and exit with status 1 instead of showing a traceback.
    """
