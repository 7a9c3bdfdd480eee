"""What callers of a tenant say, as sentences of spoken words: the recognizer's training text.

A small recognizer is only as good as its expectations. The corpus has two parts:

* the booking conversation, from templates: greetings, services, days, times, names,
  yes/no, and questions about prices, hours, places, insurance and policies;
* the tenant's knowledge base, sentence by sentence, so whatever the agent can talk
  about (a street, an insurer, "wheelchair") is a word the caller may say back.

Both are put in spoken form (``"3:30 pm"`` → ``three thirty p.m.``), the way the caller
says it; :func:`written` maps a recognized word sequence back to the written form the rest
of the node reads (``"3:30 pm"``, capitalised names), so slot extraction sees what a
cloud recognizer's smart formatting would give it.
"""

from __future__ import annotations

import itertools
import random
import re
from collections.abc import Iterable, Iterator, Sequence

from memory.extract import WEEKDAYS
from memory.knowledge import Passage

__all__ = [
    "FIRST_NAMES",
    "LAST_NAMES",
    "SERVICES",
    "booking_sentences",
    "kb_sentences",
    "kb_services",
    "spoken",
    "written",
]

_ONES = (
    "zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten",
    "eleven", "twelve", "thirteen", "fourteen", "fifteen", "sixteen", "seventeen", "eighteen",
    "nineteen",
)  # fmt: skip
_TENS = ("", "", "twenty", "thirty", "forty", "fifty", "sixty", "seventy", "eighty", "ninety")

SERVICES = ("cleaning", "checkup", "whitening", "filling", "crown", "consultation")
FIRST_NAMES = (
    "anna", "david", "emma", "james", "john", "laura", "lisa", "maria", "mark", "mary",
    "michael", "paul", "peter", "robert", "sarah", "susan", "thomas", "karen", "daniel",
    "linda", "kevin", "julia", "george", "helen", "alex", "chris", "sam", "rachel",
)  # fmt: skip
LAST_NAMES = (
    "smith", "johnson", "brown", "jones", "miller", "davis", "garcia", "lopez", "wilson",
    "taylor", "clark", "lewis", "walker", "young", "king", "green", "baker", "hill",
)  # fmt: skip
_NAMES = frozenset(FIRST_NAMES) | frozenset(LAST_NAMES)


def number_words(n: int) -> list[str]:
    """``n`` (0 ≤ n < 10,000) as English words, the way a caller says a price or count."""
    if not 0 <= n < 10_000:
        raise ValueError(f"number out of range: {n}")
    if n < 20:
        return [_ONES[n]]
    if n < 100:
        return [_TENS[n // 10]] + ([_ONES[n % 10]] if n % 10 else [])
    if n < 1000:
        rest = number_words(n % 100) if n % 100 else []
        return [_ONES[n // 100], "hundred"] + (["and", *rest] if rest else [])
    if n % 100 == 0 and n % 1000 and n < 2000:
        return [*number_words(n // 100), "hundred"]  # 1100: eleven hundred
    rest = number_words(n % 1000) if n % 1000 else []
    return [*number_words(n // 1000), "thousand", *rest]


def _time_words(hour: int, minute: int, suffix: str) -> list[str]:
    words = number_words(hour)
    if minute:
        words += (["oh"] if minute < 10 else []) + number_words(minute)
    return [*words, suffix]


_ORDINAL_LAST = {"one": "first", "two": "second", "three": "third", "five": "fifth",
                 "eight": "eighth", "nine": "ninth", "twelve": "twelfth"}  # fmt: skip


def ordinal_words(n: int) -> list[str]:
    """``3`` → ``["third"]``, ``21`` → ``["twenty", "first"]``."""
    *head, last = number_words(n)
    if last in _ORDINAL_LAST:
        return [*head, _ORDINAL_LAST[last]]
    return [*head, last[:-1] + "ieth" if last.endswith("y") else last + "th"]


_ORDINAL = re.compile(r"\b(\d{1,4})(?:st|nd|rd|th)\b", re.I)
_TIME = re.compile(r"\b(\d{1,2})(?::(\d{2}))?\s*([ap])\.?\s?m\b\.?", re.I)
_CLOCK = re.compile(r"\b(\d{1,2}):(\d{2})\b")
_MONEY = re.compile(r"\$\s?(\d[\d,]*)")
_NUMBER = re.compile(r"\b\d[\d,]*\b")
_TOKEN = re.compile(r"[ap]\.m\.|[a-z]+(?:'[a-z]+)?")


def spoken(text: str) -> list[str]:
    """Written text → the lower-case words a person says for it."""

    def time(m: re.Match[str]) -> str:
        suffix = "a.m." if m.group(3).lower() == "a" else "p.m."
        return " ".join(_time_words(int(m.group(1)), int(m.group(2) or 0), suffix))

    def number(m: re.Match[str]) -> str:
        digits = m.group(0).replace(",", "")
        if len(digits) > 4:
            return " ".join(_ONES[int(d)] for d in digits)  # phone numbers, ids
        return " ".join(number_words(int(digits)))

    text = _ORDINAL.sub(lambda m: " ".join(ordinal_words(int(m.group(1)))), text)
    text = _TIME.sub(lambda m: f" {time(m)} ", text)
    text = _CLOCK.sub(lambda m: f"{m.group(1)} {m.group(2) if m.group(2) != '00' else ''}", text)
    text = _MONEY.sub(lambda m: f"{m.group(1)} dollars", text)
    text = _NUMBER.sub(number, text)
    text = text.lower().replace("-", " ").replace("\u2019", "'")
    return _TOKEN.findall(text)


# ---------------------------------------------------------------- spoken → written

_HOUR = {w: i for i, w in enumerate(_ONES[1:13], start=1)}
_MINUTE = {w: i for i, w in enumerate(_ONES[10:20], start=10)}
_MINUTE.update({w: 10 * i for i, w in enumerate(_TENS) if i >= 2})


def _read_time(words: Sequence[str], i: int) -> tuple[str, int] | None:
    """A spoken clock time starting at ``words[i]`` → (written, words used)."""
    if words[i] not in _HOUR:
        return None
    hour, j, minute = _HOUR[words[i]], i + 1, 0
    if j < len(words) and words[j] == "oh" and j + 1 < len(words) and words[j + 1] in _HOUR:
        minute, j = _HOUR[words[j + 1]], j + 2
    elif j < len(words) and words[j] in _MINUTE:
        minute, j = _MINUTE[words[j]], j + 1
        if minute >= 20 and j < len(words) and words[j] in _HOUR and _HOUR[words[j]] < 10:
            minute, j = minute + _HOUR[words[j]], j + 1
    if j < len(words) and words[j] in ("a.m.", "p.m."):
        return f"{hour}:{minute:02d} {words[j][0]}m" if minute else f"{hour} {words[j][0]}m", j + 1
    if j < len(words) and words[j] == "o'clock":
        return f"{hour} o'clock", j + 1
    return None


def written(words: Sequence[str]) -> str:
    """Recognized spoken words → text as a smart-formatting recognizer writes it."""
    out: list[str] = []
    i = 0
    while i < len(words):
        time = _read_time(words, i)
        if time is not None:
            out.append(time[0])
            i = time[1]
            continue
        word = words[i]
        if word in _NAMES or word in WEEKDAYS or word == "i" or word.startswith("i'"):
            word = word.capitalize()
        out.append(word)
        i += 1
    return " ".join(out)


# ---------------------------------------------------------------- the booking conversation

_TIMES = ("9 am", "9:30 am", "10 am", "10:30 am", "11 am", "11:15 am", "12 pm", "1 pm",
          "1:30 pm", "2 pm", "2:45 pm", "3 pm", "3:30 pm", "4 pm", "4:30 pm", "5 pm", "noon",
          "8 am", "8:30 am", "ten o'clock", "two o'clock")  # fmt: skip
_DAYS = (*WEEKDAYS, "today", "tomorrow", "next monday", "next week", "this friday")
_PARTS = ("morning", "afternoon", "evening")
_OFFICES = ("downtown", "riverside")
_TOPICS = ("insurance", "parking", "payment", "cancellation", "children", "emergencies",
           "the address", "the price", "the hours", "directions")  # fmt: skip

# Slots: {service} {day} {time} {part} {first} {last} {office} {topic}.
_TEMPLATES = """
hi | hello | good morning | good afternoon | hello there | hi there | hey | hi good morning
hi I'd like to book a {service} | hello I would like to book an appointment
hi I'm calling about {topic} | I'm calling to book a {service} | I'm calling about my {service}
this is {first} {last} calling about my {service} | this is {first} calling about {topic}
I'd like to make an appointment for a {service} | I need a {service} | I would like a {service}
can I book a {service} on {day} | I want to schedule a {service} for {day} at {time}
I'd like to come in on {day} | can I come in {day} {part} | can I come in on {day} at {time}
is {day} at {time} available | do you have anything on {day} | {day} at {time} please
{day} {part} works for me | {day} at {time} works for me | {time} works for me | {time} is fine
how about {time} | how about {day} at {time} | at {time} | {time} please | {day} | {time}
I would like a {service} {day} {part} | I'd like a {service} on {day} {part}
my name is {first} {last} | this is {first} {last} | I'm {first} | it's {first} {last}
my name is {first} | {first} {last} | the name is {last} | my son {first} | my daughter {first}
yes | yes please | yes that's right | yeah | yep | sure | correct | sounds good | okay
yes please book it | yes book it | that's correct | perfect thank you | great | that's fine
no | no thanks | no that's wrong | not quite | no that's not right | actually no | no thank you
thank you | thanks | thank you goodbye | that's all thanks | bye | goodbye | have a nice day
sounds good thanks | great thanks | okay thank you | thanks for your help | thank you very much
how much is a {service} | how much does a {service} cost | what is the price of a {service}
what does a {service} cost | is a {service} covered by insurance | how long does a {service} take
what are your opening hours | when are you open | what time do you open on {day}
what time do you close on {day} | are you open on {day} | is the {office} office open on {day}
is the office open on {day} | are you open {day} {part} | what time do you close
where is the {office} office | what is the address of the {office} office
is there parking at the {office} office | is there parking near the office | where do I park
how do I get to the {office} office | can I take the bus
I need to cancel my appointment | can I cancel my {service} | I want to reschedule
I need to reschedule my {service} | I need to move my appointment | I have to cancel
can I move my appointment to {day} | can I reschedule to {day} {part} | I'm running late
do you take insurance | which insurance do you accept | is my insurance accepted
can I pay with a credit card | can I pay by card | do you take cash | can I pay in cash
can I pay with insurance | do you offer a payment plan
do you see children | do you treat kids | can I bring my son | can I bring my daughter
I have a toothache | my tooth hurts | I broke a tooth | my son has a toothache
is it an emergency | it's an emergency | is this an emergency | I think it's an emergency
my daughter has a toothache | I lost a filling | my crown came off | my gums are bleeding
I'm a new patient | I've been there before | I'm an existing patient | is it my first visit
can you tell me about {topic} | I have a question about {topic} | what about {topic}
sorry can you repeat that | what did you say | I didn't catch that | can you say that again
at the {office} office | the {office} office please | {office} | the {office} one
I'd like a {service} and a checkup | just a {service} | a {service} please | a {service}
""".strip()


_AN = re.compile(r"\ba (?=[aeiou])")


def _fill(template: str, rng: random.Random, services: Sequence[str]) -> str:
    values = {
        "service": rng.choice(services), "day": rng.choice(_DAYS), "time": rng.choice(_TIMES),
        "part": rng.choice(_PARTS), "first": rng.choice(FIRST_NAMES),
        "last": rng.choice(LAST_NAMES), "office": rng.choice(_OFFICES),
        "topic": rng.choice(_TOPICS),
    }  # fmt: skip
    return _AN.sub("an ", template.format(**values))  # "a oil change" → "an oil change"


def booking_sentences(
    per_template: int = 12, *, seed: int = 18, services: Sequence[str] = SERVICES
) -> Iterator[list[str]]:
    """The booking conversation, spoken: each template filled ``per_template`` times with
    random slot values (templates without slots once), deterministic for a seed.
    ``services``: what this tenant's callers book (:func:`kb_services`)."""
    rng = random.Random(seed)
    templates = [t.strip() for line in _TEMPLATES.splitlines() for t in line.split("|")]
    for template in templates:
        n = per_template if "{" in template else 1
        for _ in range(n):
            yield spoken(_fill(template, rng, services))
    # Every value at least once in a sentence of its own kind, whatever the sampling drew.
    for service, day, time in itertools.product(services, _DAYS, _TIMES[:4]):
        yield spoken(_AN.sub("an ", f"a {service} on {day} at {time}"))
    for time in _TIMES:
        yield spoken(f"{time} please")
    for first, last in zip(FIRST_NAMES, itertools.cycle(LAST_NAMES), strict=False):
        yield spoken(f"my name is {first} {last}")


_SENTENCE_END = re.compile(r"(?<=[.!?;:])\s+|\n+")
_MAX_SERVICES = 40  # a long list spreads the templates too thin to teach any of them


def kb_services(passages: Sequence[Passage]) -> tuple[str, ...]:
    """What a tenant's callers book: the sections of its knowledge base's services
    document (``services.md``: one ``##`` section per service, as the demo's), else the
    sections of all its Markdown documents; the demo's services for a knowledge base with
    no sections."""

    def sections(ps: Iterable[Passage]) -> list[str]:
        names = [p.title.split(" — ", 1)[1] for p in ps if " — " in p.title]
        spoken_names = (" ".join(spoken(n)) for n in names)
        return list(dict.fromkeys(n for n in spoken_names if n))

    own = sections(p for p in passages if p.doc_id.split(".", 1)[0] == "services")
    found = own or sections(passages)
    return tuple(found[:_MAX_SERVICES]) or SERVICES


def kb_sentences(passages: Iterable[Passage]) -> Iterator[list[str]]:
    """The knowledge base, one spoken sentence at a time (titles too: callers name them)."""
    for passage in passages:
        yield spoken(passage.title.replace("—", " "))
        for part in _SENTENCE_END.split(passage.text):
            for clause in part.split("; "):
                words = spoken(clause.replace(": ", " "))
                if words:
                    yield words
