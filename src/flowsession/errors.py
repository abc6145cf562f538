"""One error hierarchy for the whole product.

Every error carries a stable ``code`` (what the SDK maps back to a class), an HTTP ``status``
(used by the API layer only), a ``message`` for the user that names the file, field or package,
and a ``hint`` that says what to do. Anything more (the field, the file, a build log's tail) is
in ``details``, and only there: a detail can never shadow ``code``, ``message``, ``hint`` or
``status``; classes that offer a detail as an attribute (``FlowFileError.line``) read it from
``details``. Tracebacks go to logs, never into these messages.

Something that does not exist -- or exists but is not yours -- is a ``NotFound`` (404), whatever
kind of thing it is (``FlowNotFound``, ``ImageNotFound``), so ``except NotFound`` catches them all.
"""

from __future__ import annotations

from typing import Any, ClassVar


#: What ``to_dict`` says itself; a detail of the same name is dropped, never shadows it.
RESERVED = frozenset({"code", "message", "hint", "status"})


class FlowSessionError(Exception):
    code: ClassVar[str] = "error"
    status: ClassVar[int] = 500

    def __init__(self, message: str, *, hint: str = "", details: dict[str, Any] | None = None):
        super().__init__(message)
        self.message = message
        self.hint = hint
        self.details = {k: v for k, v in (details or {}).items() if k not in RESERVED}

    def __str__(self) -> str:
        return self.message

    def __getattr__(self, name: str) -> Any:
        """A detail read as an attribute (``exc.scope``, ``exc.column``). Only called when
        nothing real has that name, so ``code``, ``message``, ``hint`` and ``status`` always
        win over a detail."""
        details = self.__dict__.get("details")
        if name.startswith("_") or not details or name not in details:
            raise AttributeError(f"{type(self).__name__} has no attribute or detail {name!r}")
        return details[name]

    def to_dict(self) -> dict[str, Any]:
        return {"code": self.code, "message": self.message, "hint": self.hint,
                **{k: v for k, v in self.details.items() if k not in RESERVED}}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> FlowSessionError:
        """Rebuild an error from ``to_dict()`` (a stored failure, or an API response): the
        class of its code, everything but code, message and hint in ``details``."""
        data = dict(data)
        code = data.pop("code", "error")
        klass = cls.by_code(code)
        err = klass.__new__(klass)  # subclasses' constructors differ; the fields do not
        FlowSessionError.__init__(err, str(data.pop("message", "")),
                                  hint=str(data.pop("hint", "") or ""), details=data)
        if klass.code != code:
            err.code = code  # a code without a class of its own (e.g. "interrupted") is kept
        return err

    @classmethod
    def by_code(cls, code: str) -> type[FlowSessionError]:
        """The error class for a stable code (the SDK uses this to rebuild errors)."""
        for sub in _all_subclasses(FlowSessionError):
            if sub.code == code:
                return sub
        return FlowSessionError


def _all_subclasses(cls: type) -> list[type]:
    out = []
    for sub in cls.__subclasses__():
        out.append(sub)
        out.extend(_all_subclasses(sub))
    return out


# --- bad input (4xx) -------------------------------------------------------------------------


class InvalidInput(FlowSessionError):
    code = "invalid_input"
    status = 422


class FlowFileError(InvalidInput):
    """A flow's YAML is missing, malformed, or has a field with a bad value."""

    code = "flow_file_invalid"

    def __init__(
        self,
        message: str,
        *,
        file: str,
        line: int | None = None,
        field: str | None = None,
        hint: str = "",
    ):
        where = file if line is None else f"{file}, line {line}"
        full = f"{where}: {message}" if field is None else f"{where}: field '{field}': {message}"
        super().__init__(full, hint=hint, details={"file": file, "line": line, "field": field})

    @property
    def file(self) -> str | None:
        return self.details.get("file")

    @property
    def line(self) -> int | None:
        return self.details.get("line")

    @property
    def field(self) -> str | None:
        return self.details.get("field")


class RequirementsError(InvalidInput):
    """A line of a requirements file breaks a rule (pinned promptflow, local wheel, ...)."""

    code = "requirements_invalid"


class ImageExists(InvalidInput):
    code = "image_exists"
    status = 409


class ContainerImageUnsupported(InvalidInput):
    code = "container_image_unsupported"


class Unauthorized(FlowSessionError):
    """No valid token (the API says no more than that)."""

    code = "unauthorized"
    status = 401


class Forbidden(FlowSessionError):
    """A valid token whose roles do not grant the scope (``scope`` names it)."""

    code = "forbidden"
    status = 403


class NotFound(FlowSessionError):
    code = "not_found"
    status = 404


class FlowNotFound(NotFound):
    code = "flow_not_found"


class ImageNotFound(NotFound):
    code = "image_not_found"


class PayloadTooLarge(InvalidInput):
    """A request body over the server's limit (``limit`` in bytes)."""

    code = "payload_too_large"
    status = 413


class QuotaExceeded(FlowSessionError):
    code = "quota_exceeded"
    status = 409


class Conflict(FlowSessionError):
    """An operation on something in the wrong state (the message says which state)."""

    code = "conflict"
    status = 409


class FlowFolderMissing(Conflict):
    """A session's flow folder was deleted or moved: what needs it (reset, install) cannot
    run; the session itself runs on, and can be shown and stopped."""

    code = "flow_folder_missing"


class SessionFailed(FlowSessionError):
    code = "session_failed"
    status = 409


class LineFailed(FlowSessionError):
    code = "line_failed"
    status = 422


class StoreUnavailable(FlowSessionError):
    code = "store_unavailable"
    status = 503


# --- environment builds --------------------------------------------------------------------


class EnvironmentError_(FlowSessionError):  # trailing underscore: do not shadow the builtin
    code = "environment_error"
    status = 500

    """A build failed. ``log_tail`` holds the last lines of the build log (secrets redacted);
    ``log_path`` where the whole log is."""

    def __init__(self, message: str, *, hint: str = "", log_tail: str = "", log_path: str = "",
                 **details: Any):
        super().__init__(message, hint=hint,
                         details={"log_tail": log_tail, "log_path": log_path, **details})

    @property
    def log_tail(self) -> str:
        return self.details.get("log_tail") or ""

    @property
    def log_path(self) -> str:
        return self.details.get("log_path") or ""


class Unsatisfiable(EnvironmentError_):
    """The requirements conflict with each other or with what the image provides."""

    code = "requirements_unsatisfiable"
    status = 422


class PackageNotFound(EnvironmentError_):
    code = "package_not_found"
    status = 422


class IndexUnreachable(EnvironmentError_):
    code = "package_index_unreachable"
    status = 502


class BuildFailed(EnvironmentError_):
    """The flow's environment or its session could not be built or started from what the user
    gave (a package that fails to install, a flow that fails to load): the message says why
    and the hint where the log is. A 422, never a 500: nothing is wrong with the server."""

    code = "environment_build_failed"
    status = 422


class DiskBudgetExceeded(EnvironmentError_):
    code = "disk_budget_exceeded"
    status = 507


class EnvironmentInUse(FlowSessionError):
    code = "environment_in_use"
    status = 409
