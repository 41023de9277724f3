"""Python SDK for Nullspace sandboxes: ``Sandbox`` (sync) and ``AsyncSandbox``."""

from ._core import (CommandResult, EntryInfo, NotFoundError, SandboxError, SandboxInfo,
                    SnapshotInfo, redact_preview_token, redact_preview_url)
from .async_sandbox import AsyncCommandHandle, AsyncSandbox
from .sandbox import CommandHandle, Sandbox, Template, Volume

__all__ = [
    "AsyncCommandHandle",
    "AsyncSandbox",
    "CommandHandle",
    "CommandResult",
    "EntryInfo",
    "NotFoundError",
    "Sandbox",
    "SandboxError",
    "SandboxInfo",
    "SnapshotInfo",
    "Template",
    "Volume",
    "redact_preview_token",
    "redact_preview_url",
]
