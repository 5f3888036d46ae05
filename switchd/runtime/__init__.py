"""Runtimes start and stop engines: the Runtime protocol and its implementations."""

from switchd.runtime.base import (
    EngineExited,
    EngineInfo,
    EngineOutput,
    Runtime,
    RuntimeEvent,
    StartFailed,
)

__all__ = ["EngineExited", "EngineInfo", "EngineOutput", "Runtime", "RuntimeEvent", "StartFailed"]
