"""Python SDK for Nullspace sandboxes: ``Sandbox`` (sync) and ``AsyncSandbox``."""

from ._core import (AuditDetection, AuditPage, AuditRecord, CommandResult, EntryInfo,
                    NotFoundError, SandboxError, SandboxInfo, SandboxLifecycle, SandboxMetrics,
                    SandboxNetworkOpts, SecurityPolicy, SnapshotInfo, redact_preview_token,
                    redact_preview_url)
from .async_sandbox import (AsyncCommandHandle, AsyncCommands, AsyncFilesystem, AsyncPty,
                            AsyncPtyHandle, AsyncSandbox, AsyncSnapshot)
from .sandbox import (CommandHandle, Commands, Filesystem, Pty, PtyHandle, Sandbox, Snapshot,
                      Template, Volume)

__all__ = [
    "AsyncCommandHandle",
    "AsyncCommands",
    "AsyncFilesystem",
    "AsyncPty",
    "AsyncPtyHandle",
    "AsyncSandbox",
    "AsyncSnapshot",
    "AuditDetection",
    "AuditPage",
    "AuditRecord",
    "CommandHandle",
    "CommandResult",
    "Commands",
    "EntryInfo",
    "Filesystem",
    "NotFoundError",
    "Pty",
    "PtyHandle",
    "Sandbox",
    "SandboxError",
    "SandboxInfo",
    "SandboxLifecycle",
    "SandboxMetrics",
    "SandboxNetworkOpts",
    "SecurityPolicy",
    "Snapshot",
    "SnapshotInfo",
    "Template",
    "Volume",
    "redact_preview_token",
    "redact_preview_url",
]
