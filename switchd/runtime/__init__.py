"""Runtimes start and stop engines: the Runtime protocol and its implementations."""

from switchd.runtime.base import (
    Discovery,
    EngineExited,
    EngineInfo,
    EngineOutput,
    EventQueue,
    Runtime,
    RuntimeEvent,
    StartFailed,
)

__all__ = [
    "Discovery",
    "EngineExited",
    "EngineInfo",
    "EngineOutput",
    "EventQueue",
    "Runtime",
    "RuntimeEvent",
    "StartFailed",
]
