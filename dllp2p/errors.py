"""The errors a user may cause (bad file, bad flag, full context): shown as one line, never a traceback."""

from __future__ import annotations

from .error_codes import CodedError


def user_facing_errors() -> tuple[type[BaseException], ...]:
    from .chat import ChatTemplateError
    from .engine import ContextFull
    from .formats import ModelFileError
    from .models import NoModel
    from .tokenizer import TokenizerError

    return (ModelFileError, NoModel, TokenizerError, ChatTemplateError, ContextFull, CodedError, ValueError, OSError)
