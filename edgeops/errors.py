"""Typed errors and the exit codes they map to.

The library raises these; only the CLI turns them into a message and an exit code.
Exit codes (documented in the README):
  0  ok
  1  verification failed (parity breach) or a budget was not met
  2  usage or input error: bad option, unknown/corrupt/unsafe file, no conversion route,
     an op the converter does not support
  3  environment: a missing optional extra, an unreachable device
"""

from __future__ import annotations

EXIT_OK = 0
EXIT_VERIFY = 1
EXIT_INPUT = 2
EXIT_ENV = 3


_GENERIC = ("Exception encountered when calling", "in user code:", "Traceback")


def first_line(exc: BaseException, limit: int = 300) -> str:
    """The first line of an exception's text (or its type name), for one-line errors that
    wrap a framework's multi-page message. A generic header line (Keras' "Exception
    encountered when calling layer ...") is joined with the next line that says what."""
    text = str(exc).strip() or type(exc).__name__
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    if len(lines) > 1 and lines[0].startswith(_GENERIC):
        detail = next((ln for ln in lines[1:] if not ln.startswith(("File ", "Arguments", "•", "Call arguments"))
                       and not ln.startswith(_GENERIC)), "")
        return f"{lines[0]} {detail}".strip()[:limit]
    return lines[0][:limit]


class EdgeopsError(Exception):
    """Base error: a one-line message for people, an optional hint, an exit code."""

    exit_code = EXIT_INPUT

    def __init__(self, message: str, hint: str | None = None):
        super().__init__(message)
        self.message = message
        self.hint = hint

    def __str__(self) -> str:
        return self.message


class UsageError(EdgeopsError):
    """A bad option or combination of options."""


class FormatError(EdgeopsError):
    """The file is unknown, truncated, corrupt, or a format edgeops refuses."""


class UnsafePickleError(FormatError):
    """A pickle reaches globals outside the allow-list; it was not loaded."""


class ConversionError(EdgeopsError):
    """No route, or a converter failed (for example an unsupported op)."""


class VerificationError(EdgeopsError):
    """Outputs of the converted model do not match the source within tolerance."""

    exit_code = EXIT_VERIFY


class MissingExtraError(EdgeopsError):
    """An optional dependency group is not installed."""

    exit_code = EXIT_ENV

    def __init__(self, extra: str, module: str, what: str | None = None):
        need = f" for {what}" if what else ""
        super().__init__(
            f"{module} is not installed{need}",
            hint=f"pip install 'edgeops[{extra}]'",
        )
        self.extra = extra
        self.module = module


class NotExecutableError(EdgeopsError):
    """The model cannot be executed on this machine (e.g. Core ML on Linux)."""

    exit_code = EXIT_ENV
