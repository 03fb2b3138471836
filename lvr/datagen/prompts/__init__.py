"""Versioned prompt files: ``<name>.yaml`` with ``version``, ``system`` and ``user`` templates.

Templates use ``$name`` placeholders (``string.Template``), so JSON braces in a prompt need no
escaping. The ``version`` label is stored with every generated row and is part of the request-cache
key: bump it (or copy the file to ``<name>_v2.yaml``) whenever the wording changes meaningfully.
A prompt is named either by a built-in name (``caption_v1``) or by a path to a YAML file.
"""

from __future__ import annotations

import string
from dataclasses import dataclass
from pathlib import Path

import yaml

from lvr.errors import LvrError

PROMPT_DIR = Path(__file__).parent


class PromptError(LvrError):
    """A prompt file that is missing, malformed, or rendered without a required placeholder."""


@dataclass(frozen=True)
class Prompt:
    """A loaded prompt.

    Attributes:
        name: Built-in name or file path it was loaded from.
        version: Version label (stored in ``prompt_version`` columns and cache keys).
        system: System message template ("" for none).
        user: User message template.
    """

    name: str
    version: str
    system: str
    user: str

    def messages(self, **values: object) -> list[dict[str, str]]:
        """Render the chat messages.

        Raises:
            PromptError: A placeholder has no value.
        """
        out = []
        if self.system.strip():
            out.append({"role": "system", "content": self._fill(self.system, values)})
        out.append({"role": "user", "content": self._fill(self.user, values)})
        return out

    def _fill(self, template: str, values: dict[str, object]) -> str:
        try:
            return string.Template(template).substitute({k: str(v) for k, v in values.items()})
        except KeyError as exc:
            raise PromptError(f"prompt {self.name} needs a value for ${exc.args[0]}") from None
        except ValueError as exc:
            raise PromptError(f"prompt {self.name} has a bad placeholder: {exc}") from None


def available() -> list[str]:
    """Names of the built-in prompts."""
    return sorted(p.stem for p in PROMPT_DIR.glob("*.yaml"))


def load_prompt(name: str) -> Prompt:
    """Load a built-in prompt by name, or a prompt YAML by path.

    Raises:
        PromptError: Unknown name, unreadable file, or missing ``version``/``user`` keys.
    """
    path = Path(name)
    if not (path.suffix in (".yaml", ".yml") and path.is_file()):
        path = PROMPT_DIR / f"{name}.yaml"
    if not path.is_file():
        raise PromptError(
            f"unknown prompt {name!r}; built-in: {', '.join(available())} (or a .yaml path)"
        )
    try:
        data = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as exc:
        raise PromptError(f"cannot read prompt {path}: {str(exc).splitlines()[0]}") from None
    if not isinstance(data, dict) or not data.get("version") or not data.get("user"):
        raise PromptError(
            f"prompt {path} must be a mapping with 'version' and 'user' (and optional 'system')"
        )
    return Prompt(name, str(data["version"]), str(data.get("system") or ""), str(data["user"]))


def inline_prompt(text: str, version: str, system: str = "") -> Prompt:
    """A prompt given inline in a config (``caption.prompt_text``)."""
    return Prompt("<inline>", version, system, text)
