"""Versioned prompt files: ``<name>.yaml`` with ``version``, ``system`` and ``user`` templates.

Templates use ``$name`` placeholders (``string.Template``), so JSON braces in a prompt need no
escaping; a literal dollar sign is ``$$``. The ``version`` label is stored with every generated
row and is part of the request-cache key (with the whole request, so a changed wording is never a
cache hit): bump it (or copy the file to ``<name>_v2.yaml``) whenever the wording changes
meaningfully, so that rows of the two wordings can be told apart.
A prompt is named either by a built-in name (``caption_v1``) or by a path to a YAML file.
"""

from __future__ import annotations

import string
from collections.abc import Collection, Sequence
from dataclasses import dataclass
from pathlib import Path

import yaml

from lvr.config import yaml_problem
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
            raise PromptError(
                f"prompt {self.name} has a bad placeholder: {exc} (write $$ for a literal $)"
            ) from None

    def placeholders(self) -> set[str]:
        """The ``$name`` placeholders of the system and user templates.

        Raises:
            PromptError: A ``$`` that starts no placeholder (a literal dollar sign is ``$$``).
        """
        found: set[str] = set()
        for template in (self.system, self.user):
            for match in string.Template.pattern.finditer(template):
                if match.group("invalid") is not None:
                    line = template[: match.start()].count("\n") + 1
                    raise PromptError(
                        f"prompt {self.name}: '$' at line {line} of a template starts no "
                        "placeholder; write $$ for a literal $"
                    )
                name = match.group("named") or match.group("braced")
                if name:
                    found.add(name)
        return found

    def check(self, known: Collection[str], required: Sequence[Collection[str]] = ()) -> None:
        """Fail now on what would fail every request of a stage later, or silently mislead it.

        Args:
            known: The placeholders the stage fills (any other one could never be filled).
            required: Groups of placeholders of which the prompt must use at least one each (a
                qa prompt without ``$captions`` would ask about a video the model never sees).

        Raises:
            PromptError: Unknown or missing placeholders, or a stray ``$``.
        """
        used = self.placeholders()
        unknown = sorted(used - set(known))
        if unknown:
            raise PromptError(
                f"prompt {self.name} uses {', '.join('$' + u for u in unknown)}, which this stage "
                f"does not fill; its placeholders: {', '.join('$' + k for k in sorted(known)) or 'none'}"
                " (write $$ for a literal $)"
            )
        for group in required:
            if not used & set(group):
                raise PromptError(
                    f"prompt {self.name} must use {' or '.join('$' + g for g in sorted(group))}"
                )


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
        # A file name is read from the current directory, not from the config file's folder.
        where = (
            f" (no such file from {Path.cwd()})" if Path(name).suffix in (".yaml", ".yml") else ""
        )
        raise PromptError(
            f"unknown prompt {name!r}{where}; built-in: {', '.join(available())} (or a .yaml path)"
        )
    try:
        data = yaml.safe_load(path.read_text())
    except OSError as exc:
        raise PromptError(f"cannot read prompt {path}: {exc}") from None
    except yaml.YAMLError as exc:
        raise PromptError(f"prompt {path} is not valid YAML: {yaml_problem(exc)}") from None
    if not isinstance(data, dict) or not data.get("version") or not data.get("user"):
        raise PromptError(
            f"prompt {path} must be a mapping with 'version' and 'user' (and optional 'system')"
        )
    return Prompt(name, str(data["version"]), str(data.get("system") or ""), str(data["user"]))


def inline_prompt(text: str, version: str, system: str = "") -> Prompt:
    """A prompt given inline in a config (``caption.prompt_text``), taken literally.

    An inline prompt is plain text, not a template: a ``$`` in it ("prices in $") is kept as
    written (it is escaped here, so rendering gives the text back unchanged).
    """
    return Prompt("<inline>", version, system.replace("$", "$$"), text.replace("$", "$$"))
