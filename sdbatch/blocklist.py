"""Prompt filter: a list of rules that a prompt (or negative prompt) must not match.

A blocklist file holds one rule per line:

- `re:PATTERN` is a Python regular expression, searched case-insensitively;
- a line starting with `#` is a comment, a blank line is skipped;
- any other line is a word or phrase, matched case-insensitively on word boundaries (the
  phrase "red car" matches "A Red  car." but not "red cart" or "bored car"); runs of spaces
  inside a phrase match any run of whitespace.

Leading and trailing whitespace of a line is ignored (a regex that must match a space at its
ends can use `\\s` or `[ ]`).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from sdbatch import storage

REGEX_PREFIX = "re:"


class BlocklistError(ValueError):
    """A blocklist that cannot be read or holds an invalid rule; the message names the file and line."""


@dataclass(frozen=True)
class Rule:
    """One rule: the line as written (`text`), where it came from, and its compiled pattern."""

    text: str
    source: str
    line: int
    pattern: re.Pattern

    def __str__(self) -> str:
        return f"'{self.text}' ({self.source}, line {self.line})"


def _phrase_pattern(phrase: str) -> str:
    # (?<!\w)/(?!\w) rather than \b: a phrase that starts or ends with punctuation ("c++")
    # still needs a non-word character (or the text's end) beside it.
    words = (re.escape(w) for w in phrase.split())
    return r"(?<!\w)" + r"\s+".join(words) + r"(?!\w)"


def parse_rule(text: str, source: str = "<blocklist>", line: int = 0) -> Rule | None:
    """One line -> a Rule, or None for a blank or comment line.

    Raises BlocklistError (naming `source` and `line`) for an invalid or empty regular expression.
    """
    text = text.strip()
    if not text or text.startswith("#"):
        return None
    if text.startswith(REGEX_PREFIX):
        body = text[len(REGEX_PREFIX):]
        if not body:
            raise BlocklistError(f"{source}, line {line}: empty regular expression after 're:'")
    else:
        body = _phrase_pattern(text)
    try:
        return Rule(text, source, line, re.compile(body, re.IGNORECASE))
    except re.error as e:
        raise BlocklistError(f"{source}, line {line}: invalid regular expression '{text}': {e}") from None


@dataclass(frozen=True)
class Blocklist:
    """An ordered set of rules; `match` reports the first one a prompt matches."""

    rules: tuple[Rule, ...]
    source: str = "<blocklist>"

    @classmethod
    def parse(cls, text: str, source: str = "<blocklist>") -> Blocklist:
        """Rules from a blocklist file's text (see the module docstring). Raises BlocklistError."""
        rules = (parse_rule(line, source, i) for i, line in enumerate(text.splitlines(), start=1))
        return cls(tuple(r for r in rules if r is not None), source)

    def match(self, prompt: str, negative: str | None = "") -> Rule | None:
        """The first rule that matches `prompt` or `negative`, else None."""
        for rule in self.rules:
            if rule.pattern.search(prompt or "") or rule.pattern.search(negative or ""):
                return rule
        return None

    def check(self, prompt: str, negative: str | None = "") -> str | None:
        """An error message naming the rule `prompt`/`negative` match, else None."""
        rule = self.match(prompt, negative)
        if rule is None:
            return None
        where = "prompt" if rule.pattern.search(prompt or "") else "negative prompt"
        return f"the {where} matches blocklist rule {rule}"

    def __len__(self) -> int:
        return len(self.rules)


def load_blocklist(uri: str) -> Blocklist:
    """Read a blocklist (UTF-8 text) from a local path or any fsspec URI.

    Raises BlocklistError naming the file when it is missing, unreadable, not UTF-8, or holds
    an invalid regular expression (then also the line).
    """
    try:
        fs, path = storage.url_to_fs(uri)
        data = storage.read_bytes(fs, path)
    except (OSError, ValueError) as e:
        raise BlocklistError(f"{uri}: cannot read the blocklist: {e}") from None
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise BlocklistError(f"{uri}: the blocklist is not UTF-8 text: {e}") from None
    return Blocklist.parse(text, uri)
