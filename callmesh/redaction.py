"""PII redaction: phone numbers, e-mail addresses and payment card numbers in text.

Text leaves a call at a few boundaries (the per-call event log, process logs, effects
sinks' logs); each runs what it writes through a :class:`Redactor`, which replaces every
finding by a mask (``[phone ••••0123]``, ``[email j•••@example.com]``,
``[card ••••4242]``) or by a keyed hash (``[phone#a1b2c3d4]``: HMAC-SHA256 with the
configured key, truncated, stable per value so analytics and replay can still tell that
two calls gave the same number without anyone being able to read it).

Redaction is idempotent (a redacted text has nothing left to find), so a boundary may
redact what an earlier one already did, and replay may redact an old log again.

The same pass masks credentials of URLs anywhere in the text (``redis://:pw@host`` →
``redis://:***@host``, ``?token=...`` → ``?token=***``, :mod:`callmesh.secret_masking`), so
a log line that quotes a URL does not leak it.

Detection is conservative where a false positive would mangle data the call needs:
cards must be 13-19 digits that pass the Luhn check; national phone numbers must have a
North American shape (NXX NXX XXXX) or a trunk ``0`` and 9-12 digits; times, dates,
prices, short ids and years do not match. Spelled-out forms ("john at example dot com")
are not detected.
"""

from __future__ import annotations

import hmac
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

from callmesh.secret_masking import mask_secrets

ENV_MODE = "CALLMESH_REDACTION_MODE"
ENV_KEY = "CALLMESH_REDACTION_KEY"
MASK_CHAR = "•"
HASH_HEX_CHARS = 8

# Record and log fields that hold identifiers, never free text: left as they are so logs
# and replay stay joinable (a numeric call id must not read as a phone number).
ID_FIELDS = frozenset(
    {
        "type",
        "turn",
        "ts_ms",
        "seq",
        "n",
        "id",
        "msg_id",
        "_msg_id",
        "_seq",
        "call_id",
        "tenant",
        "node",
        "router",
        "epoch",
        "kind",
        "effect_id",
        "prompt_digest",
    }
)


class RedactionMode(StrEnum):
    MASK = "mask"  # [phone ••••0123]
    HASH = "hash"  # [phone#a1b2c3d4]: HMAC-SHA256 with the key, stable per value


# A shorter key could be brute-forced together with the small space of phone numbers.
MIN_KEY_BYTES = 16


@dataclass(frozen=True)
class RedactionConfig:
    """How PII is redacted. Every process of a cluster must use the same settings, or
    replay verification reports divergences (:mod:`events.replay_verify`)."""

    mode: RedactionMode = RedactionMode.MASK
    key: str = field(default="", repr=False)

    def __post_init__(self) -> None:
        if self.mode is RedactionMode.HASH and len(self.key.encode()) < MIN_KEY_BYTES:
            raise ValueError(f"redaction mode hash needs a key of >= {MIN_KEY_BYTES} bytes")

    @classmethod
    def from_env(cls, env: Mapping[str, str]) -> RedactionConfig:
        """The settings as every process reads them (declared in callmesh.settings.table)."""
        mode = env.get(ENV_MODE) or RedactionMode.MASK.value
        try:
            parsed = RedactionMode(mode)
        except ValueError as exc:
            raise ValueError(f"{ENV_MODE} must be mask or hash, got {mode!r}") from exc
        return cls(mode=parsed, key=env.get(ENV_KEY, ""))


class PiiKind(StrEnum):
    CARD = "card"
    EMAIL = "email"
    PHONE = "phone"


@dataclass(frozen=True, slots=True)
class Finding:
    kind: PiiKind
    start: int
    end: int
    value: str


# --------------------------------------------------------------------------- detection

# A run of digits with single spaces or dashes between them, not part of a longer token,
# a decimal number or a dashed id. A card is 13-19 consecutive digits of it, group-aligned:
# a card is often said with its expiry or security code after it.
_DIGIT_RUN = re.compile(r"(?<![\w+\-./#])\d(?:[ -]?\d){12,}(?![\w\-/]|[.,]\d)")
_DIGIT_GROUP = re.compile(r"\d+")
_EMAIL = re.compile(
    r"(?<![\w.%+\-])[A-Za-z0-9][A-Za-z0-9._%+\-]{0,63}@"
    r"(?:[A-Za-z0-9](?:[A-Za-z0-9\-]{0,61}[A-Za-z0-9])?\.){1,8}[A-Za-z]{2,24}(?![\w\-])"
)
_PHONE_TAIL = r"(?![\w]|[.,\-/:]\d)"
# E.164 as written or spoken: +CC then groups, optionally with a parenthesised area code.
_PHONE_INTL = re.compile(
    r"(?<![\w+#])\+\d{1,3}(?:[ .\-]?(?:\(\d{1,4}\)|\d{1,5})){1,6}" + _PHONE_TAIL
)
# North American: (NXX) NXX-XXXX, NXX-NXX-XXXX, NXX.NXX.XXXX, NXXNXXXXXX, optional 1.
_PHONE_NANP = re.compile(
    r"(?<![\w+\-./#$])(?:1[ .\-]?)?(?:\([2-9]\d{2}\)\s?|[2-9]\d{2}[ .\-]?)[2-9]\d{2}[ .\-]?\d{4}"
    + _PHONE_TAIL
)
# With a trunk prefix (most of the world): 020 7946 0958, 07911 123456, 01 23 45 67 89.
_PHONE_TRUNK = re.compile(r"(?<![\w+\-./#$])0\d{1,4}(?:[ \-]?\d{2,4}){2,4}" + _PHONE_TAIL)


def _digits(text: str) -> str:
    # isdecimal: what the patterns' \d matches (any script's decimal digits), in ASCII so
    # one number has one hash however it was written.
    return "".join(str(int(c)) for c in text if c.isdecimal())


def luhn_valid(digits: str) -> bool:
    total = 0
    for i, ch in enumerate(reversed(digits)):
        d = ord(ch) - 48  # ASCII digits (_digits)
        if i % 2:
            d = d * 2 - 9 if d > 4 else d * 2
        total += d
    return total % 10 == 0


def _cards_in_run(text: str, start: int, end: int) -> list[Finding]:
    groups = [(m.start(), m.end()) for m in _DIGIT_GROUP.finditer(text, start, end)]
    out, i = [], 0
    while i < len(groups):
        best, digits = None, ""
        for j in range(i, len(groups)):
            digits += _digits(text[groups[j][0] : groups[j][1]])
            if len(digits) > 19:
                break
            if len(digits) >= 13 and luhn_valid(digits):
                best = j  # the longest card starting at group i
        if best is None:
            i += 1
            continue
        a, b = groups[i][0], groups[best][1]
        out.append(Finding(PiiKind.CARD, a, b, text[a:b]))
        i = best + 1
    return out


def _cards(text: str) -> list[Finding]:
    out = []
    for m in _DIGIT_RUN.finditer(text):
        out += _cards_in_run(text, m.start(), m.end())
    return out


def _emails(text: str) -> list[Finding]:
    if "@" not in text:
        return []
    return [Finding(PiiKind.EMAIL, m.start(), m.end(), m.group()) for m in _EMAIL.finditer(text)]


def _phones(text: str) -> list[Finding]:
    out = []
    for pattern, lo, hi in ((_PHONE_INTL, 8, 15), (_PHONE_NANP, 10, 11), (_PHONE_TRUNK, 9, 12)):
        for m in pattern.finditer(text):
            if lo <= len(_digits(m.group())) <= hi:
                out.append(Finding(PiiKind.PHONE, m.start(), m.end(), m.group()))
    return out


# Eight digits close together: the least any phone number or card has. Found at C speed,
# it spares the detectors the text of almost every turn.
_DENSE_DIGITS = re.compile(r"\d(?:\D{0,3}\d){7}")


def find_pii(text: str) -> list[Finding]:
    """Every phone number, e-mail address and card number in ``text``, in order. Where
    findings overlap the stronger one wins: an e-mail over the digits in it, a
    Luhn-checked card over a phone-shaped part of it."""
    found = _emails(text)
    if _DENSE_DIGITS.search(text):
        found += _cards(text) + _phones(text)
    chosen: list[Finding] = []
    for f in found:  # in order of strength: e-mails, cards, phones
        if all(f.end <= c.start or f.start >= c.end for c in chosen):
            chosen.append(f)
    return sorted(chosen, key=lambda f: f.start)


# --------------------------------------------------------------------------- redactor


def _normalized(kind: PiiKind, value: str) -> str:
    """One spelling per value, so a hash is stable however the caller wrote it."""
    if kind is PiiKind.EMAIL:
        return value.lower()
    digits = _digits(value)
    if kind is PiiKind.PHONE:
        if value.lstrip().startswith("+"):
            return "+" + digits
        if len(digits) == 10 and digits[0] in "23456789":
            return "+1" + digits  # North American national form of the same number
        if len(digits) == 11 and digits[0] == "1":
            return "+" + digits
    return digits


class Redactor:
    """Replaces PII in text and in JSON-like values, by mask or by keyed hash."""

    def __init__(self, config: RedactionConfig | None = None) -> None:
        self.config = config or RedactionConfig()
        self._key = self.config.key.encode()
        self._hash = self.config.mode is RedactionMode.HASH

    @property
    def mode(self) -> RedactionMode:
        return self.config.mode

    def token(self, finding: Finding) -> str:
        """What replaces one finding."""
        kind, value = finding.kind, finding.value
        if self._hash:
            mac = hmac.new(self._key, f"{kind}:{_normalized(kind, value)}".encode(), "sha256")
            return f"[{kind}#{mac.hexdigest()[:HASH_HEX_CHARS]}]"
        if kind is PiiKind.EMAIL:
            local, _, domain = value.partition("@")
            return f"[email {local[:1]}{MASK_CHAR * 3}@{domain}]"
        return f"[{kind} {MASK_CHAR * 4}{_digits(value)[-4:]}]"

    def redact_text(self, text: str) -> str:
        """``text`` with secrets in URLs masked and every PII finding replaced."""
        text = mask_secrets(text)
        findings = find_pii(text)
        if not findings:
            return text
        parts, last = [], 0
        for f in findings:
            parts += [text[last : f.start], self.token(f)]
            last = f.end
        parts.append(text[last:])
        return "".join(parts)

    def redact_value(self, value: Any, skip: frozenset[str] = ID_FIELDS) -> Any:
        """A copy of a JSON-like value with every string redacted, except the values of
        dict keys in ``skip`` (identifiers). Dict keys themselves are kept."""
        if isinstance(value, str):
            return self.redact_text(value)
        if isinstance(value, dict):
            return {k: v if k in skip else self.redact_value(v, skip) for k, v in value.items()}
        if isinstance(value, (list, tuple)):
            return [self.redact_value(v, skip) for v in value]
        return value

    def __repr__(self) -> str:
        return f"<Redactor {self.config.mode.value}>"


_default: Redactor | None = None


def default_redactor() -> Redactor:
    """The process's redactor, from its environment (``CALLMESH_REDACTION_MODE``,
    ``CALLMESH_REDACTION_KEY``) on first use. Process-wide on purpose: every boundary of
    the process must redact the same way, including code that has no configuration at
    hand (a log filter, the event-log encoder)."""
    global _default
    if _default is None:
        _default = Redactor(RedactionConfig.from_env(os.environ))
    return _default


def configure(redactor: Redactor | None) -> None:
    """Set the process's redactor (None: read the environment again on next use)."""
    global _default
    _default = redactor
