from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from typing import ClassVar as _ClassVar, Optional as _Optional

DESCRIPTOR: _descriptor.FileDescriptor

class ApplyRequest(_message.Message):
    __slots__ = ("config_yaml", "dry_run", "drain_timeout_s")
    CONFIG_YAML_FIELD_NUMBER: _ClassVar[int]
    DRY_RUN_FIELD_NUMBER: _ClassVar[int]
    DRAIN_TIMEOUT_S_FIELD_NUMBER: _ClassVar[int]
    config_yaml: str
    dry_run: bool
    drain_timeout_s: float
    def __init__(self, config_yaml: _Optional[str] = ..., dry_run: _Optional[bool] = ..., drain_timeout_s: _Optional[float] = ...) -> None: ...

class ApplyProgress(_message.Message):
    __slots__ = ("line", "done", "ok")
    LINE_FIELD_NUMBER: _ClassVar[int]
    DONE_FIELD_NUMBER: _ClassVar[int]
    OK_FIELD_NUMBER: _ClassVar[int]
    line: str
    done: bool
    ok: bool
    def __init__(self, line: _Optional[str] = ..., done: _Optional[bool] = ..., ok: _Optional[bool] = ...) -> None: ...
