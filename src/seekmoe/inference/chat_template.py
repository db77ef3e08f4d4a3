"""The chat template: how a list of {role, content} messages becomes one prompt for a base model."""

from __future__ import annotations

ROLES = ("system", "user", "assistant")
ROLE_NAMES = {"system": "System", "user": "User", "assistant": "Assistant"}
# What ends an assistant turn besides end-of-text: the model starting the next user turn by itself.
CHAT_STOP = ["\nUser:"]


def format_chat(messages: list[dict]) -> str:
    """'System: ...\\n\\nUser: ...\\n\\nAssistant: ...' turn by turn, ending with an open 'Assistant:' turn."""
    if not isinstance(messages, list) or not messages:
        raise ValueError(f"messages={messages!r} is invalid: expected a non-empty list of {{role, content}} objects")
    turns = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or m.get("role") not in ROLES or not isinstance(m.get("content"), str):
            raise ValueError(f"messages[{i}]={m!r} is invalid: expected {{'role': one of {list(ROLES)}, "
                             f"'content': a string}}")
        turns.append(f"{ROLE_NAMES[m['role']]}: {m['content']}")
    return "\n\n".join(turns) + "\n\nAssistant:"
