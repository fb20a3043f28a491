"""Chat messages -> one prompt string, for /v1/chat/completions (orchestrator/gateway.py).

If the model directory's tokenizer_config.json has a `chat_template` (Jinja, as Hugging Face tokenizers ship
it), it is rendered with the messages and `add_generation_prompt=True`, in a sandboxed Jinja environment. Models
without one (the tiny test models) use a plain role-prefixed format, documented in docs/observability.md:

    System: You are terse.
    User: Hello
    Assistant:

(each message on its own line as `Role: content`, then `Assistant:` for the model to continue).

The router tokenizes the result with the model's tokenizer, which adds the beginning-of-sequence token itself; a
template that writes it too would double it, so a leading `bos_token` in the rendered text is removed.
"""

from __future__ import annotations

import json
from pathlib import Path

from orchestrator.gateway_protocol import GatewayError, bad_request

_ROLES = {"system": "System", "developer": "System", "user": "User", "assistant": "Assistant"}


class ChatFormatter:
    """Who calls it: the gateway, once per chat request (`render(messages) -> str`)."""

    def __init__(self, template: str | None = None, *, bos_token: str = "", eos_token: str = "") -> None:
        self.template_source = template
        self._bos_token = bos_token
        self._eos_token = eos_token
        self._template = _compile(template) if template else None

    @property
    def has_template(self) -> bool:
        return self._template is not None

    @classmethod
    def from_model_dir(cls, model_dir: str | Path | None) -> "ChatFormatter":
        """The template in model_dir/tokenizer_config.json, if any; else the role-prefixed format."""
        if model_dir is None:
            return cls()
        path = Path(model_dir) / "tokenizer_config.json"
        if not path.exists():
            return cls()
        config = json.loads(path.read_text())
        template = config.get("chat_template")
        if isinstance(template, list):  # [{"name": "default", "template": ...}, {"name": "tool_use", ...}]
            by_name = {entry.get("name"): entry.get("template") for entry in template if isinstance(entry, dict)}
            template = by_name.get("default")
        return cls(template if isinstance(template, str) else None, bos_token=_token_text(config.get("bos_token")),
                   eos_token=_token_text(config.get("eos_token")))

    def render(self, messages) -> str:
        messages = _check_messages(messages)
        if self._template is None:
            lines = [f"{_ROLES[m['role']]}: {m['content']}" for m in messages]
            return "\n".join(lines + ["Assistant:"])
        try:
            text = self._template.render(messages=messages, add_generation_prompt=True, bos_token=self._bos_token,
                                         eos_token=self._eos_token)
        except GatewayError:
            raise
        except Exception as error:  # a template that refuses these messages (raise_exception) or is broken
            raise bad_request("messages", f"the model's chat template failed: {error}") from None
        if self._bos_token and text.startswith(self._bos_token):
            text = text[len(self._bos_token):]
        return text


def _token_text(token) -> str:
    if isinstance(token, dict):  # {"content": "<s>", "lstrip": false, ...}
        token = token.get("content")
    return token if isinstance(token, str) else ""


def _compile(source: str):
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message):
        raise bad_request("messages", str(message))

    def strftime_now(fmt):
        import datetime

        return datetime.datetime.now().strftime(fmt)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    env.filters["tojson"] = lambda value, indent=None: json.dumps(value, ensure_ascii=False, indent=indent)
    env.globals.update(raise_exception=raise_exception, strftime_now=strftime_now)
    return env.from_string(source)


def _check_messages(messages) -> list[dict]:
    if not isinstance(messages, list) or not messages:
        raise bad_request("messages", "expected a non-empty list of {role, content} objects")
    checked = []
    for index, message in enumerate(messages):
        where = f"messages[{index}]"
        if not isinstance(message, dict):
            raise bad_request(where, "expected an object with role and content")
        role = message.get("role")
        if role not in _ROLES:
            raise bad_request(f"{where}.role", f"{role!r} is not one of: {', '.join(_ROLES)}")
        checked.append({"role": role, "content": _content_text(message.get("content"), f"{where}.content")})
    return checked


def _content_text(content, where: str) -> str:
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list):  # [{"type": "text", "text": "..."}, ...]
        parts = []
        for part in content:
            if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                raise bad_request(where, "only text parts ({\"type\": \"text\", \"text\": ...}) are supported")
            parts.append(part["text"])
        return "".join(parts)
    raise bad_request(where, "expected a string or a list of text parts")
