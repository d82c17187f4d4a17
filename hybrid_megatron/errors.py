"""The base class of every error a user can cause, so entry points catch one type.

A recipe field, a data prefix, a tokenizer, a checkpoint path or a command-line choice that is
wrong raises a subclass of :class:`InputError` whose message names the offending field or file;
entry points print that one line instead of a traceback. Anything else is a bug and keeps its
traceback. Imports nothing, so any module (and the launcher) can use it cheaply.
"""

from __future__ import annotations


class InputError(Exception):
    """Something the user can fix (recipe, data, tokenizer, checkpoint, path, argument).

    The message is complete on its own: it starts with the field or file it is about and says
    what is wrong with it. Subclasses add a builtin second base (ValueError, RuntimeError)
    where existing callers catch that.
    """
