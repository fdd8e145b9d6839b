"""The errors a user may cause (bad file, bad flag, full context, a request the root refuses): shown as
one line, never a traceback. Each may name its error_codes.ErrorCode (a `code` attribute: ContextFull,
CodedError); error_codes.code_of reads it where an Error frame or an HTTP status is made of one."""

from __future__ import annotations

from .chat import ChatTemplateError
from .engine import ContextFull
from .error_codes import CodedError
from .formats import ModelFileError
from .models import NoModel
from .tokenizer import TokenizerError

USER_FACING: tuple[type[BaseException], ...] = (
    ModelFileError, NoModel, TokenizerError, ChatTemplateError, ContextFull, CodedError, ValueError, OSError)


def user_facing_errors() -> tuple[type[BaseException], ...]:
    return USER_FACING
