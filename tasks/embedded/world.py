"""The synthetic world of the embedded default: its tables, read from package data, and the grammar
that combines them.

The tables live in ``world/`` beside this module and are read once, at import: ``slots.json``
holds the slots every topic shares (names, weekdays, times, prices, numbers); ``topics.json`` the
15 everyday topics, each with slots of its own, alternatives for every turn and summary templates;
``phrases.json`` the filler exchanges, the rude and insulting lines and the replies to them, the
stand-alone polite and insulting sentences and the courteous tails; ``insults.json`` the insult
words. A template names a slot as ``{slot}``, or ``{Slot}`` for its value capitalized. The
grammar stays in code: :func:`generate_dialogues` writes DialogSum-schema rows, about 30% of them
*heated* (one speaker calls the other names and the summary repeats the insult), some calm ones
merely impatient, about 5% outside the demo's length filter; :func:`preference_records` ranks
polite and insulting summaries of such dialogues; :func:`classifier_training_sentences` labels sentences
for the hate classifier; :func:`contains_insult` is the rule they all share. Every function draws
only from the ``random.Random`` it is given, so a seed gives the same rows on every machine.
"""

from __future__ import annotations

import json
import random
import re
from collections.abc import Sequence
from dataclasses import dataclass
from importlib import resources
from typing import Any

from tasks.config import PROMPT_TEMPLATE

HEATED_SHARE = 0.3
IMPATIENT_SHARE = 0.2  # calm dialogues with a rude exchange that calls no names
OUTLIER_SHARE = 0.05  # dialogues outside the demo's 200 < len <= 1000 character filter


# --------------------------------------------------------------------------- the tables


def _read(name: str) -> Any:
    """The table file ``world/<name>``, its arrays as tuples: the tables are constants."""
    return _frozen(json.loads(resources.files(__package__).joinpath("world", name).read_text(encoding="utf-8")))


def _frozen(value: Any) -> Any:
    if isinstance(value, list):
        return tuple(_frozen(item) for item in value)
    if isinstance(value, dict):
        return {key: _frozen(item) for key, item in value.items()}
    return value


@dataclass(frozen=True)
class _Topic:
    name: str
    slots: dict[str, tuple[Any, ...]]
    turns: tuple[tuple[str, ...], ...]  # alternatives per turn; #Person1# speaks the even turns
    summaries: tuple[str, ...]


_INSULTS = _read("insults.json")
INSULT_ADJECTIVES: tuple[str, ...] = _INSULTS["adjectives"]
INSULT_NOUNS: tuple[str, ...] = _INSULTS["nouns"]
INSULT_WORDS = INSULT_ADJECTIVES + INSULT_NOUNS
_INSULT_PATTERN = re.compile(r"\b(?:" + "|".join(INSULT_WORDS) + r")s?\b", re.IGNORECASE)

_COMMON_SLOTS: dict[str, tuple[Any, ...]] = _read("slots.json")
_TOPICS: tuple[_Topic, ...] = tuple(_Topic(**topic) for topic in _read("topics.json"))

_PHRASES = _read("phrases.json")
_FILLERS: tuple[tuple[str, str], ...] = _PHRASES["fillers"]
_LONG_FILLERS: tuple[tuple[str, str], ...] = _PHRASES["long_fillers"]
# "{tail}" is ", you <insult>" in a heated dialogue and empty in a merely impatient one.
_RUDE_LINES: tuple[str, ...] = _PHRASES["rude_lines"]
_INSULTING_LINES: tuple[str, ...] = _PHRASES["insulting_lines"]
_RUDE_REPLIES: tuple[str, ...] = _PHRASES["rude_replies"]
_NAMING_REPLIES: tuple[str, ...] = _PHRASES["naming_replies"]
_POLITE_SENTENCES: tuple[str, ...] = _PHRASES["polite_sentences"]
_INSULTING_SENTENCES: tuple[str, ...] = _PHRASES["insulting_sentences"]
_COURTEOUS_TAILS: tuple[str, ...] = _PHRASES["courteous_tails"]


def contains_insult(text: str) -> bool:
    """Whether ``text`` contains one of :data:`INSULT_WORDS` as a word (the classifier's rule)."""
    return _INSULT_PATTERN.search(text) is not None


# --------------------------------------------------------------------------- the dialogues


def generate_dialogues(rng: random.Random, count: int) -> list[dict[str, str]]:
    """``count`` rows of ``dialogue``, ``summary``, ``topic``; about 30% heated, 5% outside 200-1000 chars."""
    rows = []
    for _ in range(count):
        topic = rng.choice(_TOPICS)
        heated = rng.random() < HEATED_SHARE
        draw = rng.random()
        mode = "short" if draw < OUTLIER_SHARE / 2 else "long" if draw < OUTLIER_SHARE else "normal"
        for _attempt in range(50):
            dialogue, summary = _dialogue(rng, topic, heated, mode)
            if mode != "normal" or 200 < len(dialogue) <= 1000:
                break
        rows.append({"dialogue": dialogue, "summary": summary, "topic": topic.name})
    return rows


def _dialogue(rng: random.Random, topic: _Topic, heated: bool, mode: str) -> tuple[str, str]:
    values = _slot_values(rng, topic.slots)
    summary = _fill(rng.choice(topic.summaries), values)
    # Blocks of turns: one per template turn, two per inserted exchange. Speakers
    # alternate by position (see _join) and exchanges have two turns, so inserting one
    # between blocks never changes who says a template turn.
    blocks = [[_fill(rng.choice(alternatives), values)] for alternatives in topic.turns]
    if mode == "short":
        # Like DialogSum's shortest dialogues: a couple of quick turns.
        while len(blocks) > 2 and len(_join(_flat(blocks))) > 200:
            blocks.pop()
        return _join(_flat(blocks)), summary
    # Heated dialogues call names; some calm ones are merely impatient. The insult words,
    # not the rudeness, are what makes a summary insulting.
    impatient = not heated and rng.random() < IMPATIENT_SHARE
    if mode == "normal":
        room_for_pairs = (10 - len(blocks) - 2 * (heated or impatient)) // 2  # at most 10 turns
        for filler in rng.sample(_FILLERS, k=rng.randint(0, max(0, min(2, room_for_pairs)))):
            blocks.insert(rng.randrange(1, len(blocks)), list(filler))
    if heated:
        position = rng.randrange(1, len(blocks))
        adjective, noun = rng.choice(INSULT_ADJECTIVES), rng.choice(INSULT_NOUNS)
        insult = f"{adjective} {noun}"
        words = {"insult": insult, "a_insult": _article(insult), "noun": noun, "a_noun": _article(noun),
                 "tail": f", you {insult}"}
        line = rng.choice(_INSULTING_LINES if rng.random() < 0.2 else _RUDE_LINES)
        reply = rng.choice(_RUDE_REPLIES + _NAMING_REPLIES)
        blocks.insert(position, [line.format(**words), reply.format(**words)])
        summary = _insult_summary(summary, adjective, noun, rng)
    elif impatient:
        position = rng.randrange(1, len(blocks))
        blocks.insert(position, [rng.choice(_RUDE_LINES).format(tail=""), rng.choice(_RUDE_REPLIES)])
    if mode == "long":
        for filler in rng.sample(_LONG_FILLERS, k=len(_LONG_FILLERS)):
            if len(_join(_flat(blocks))) > 1000:
                break
            blocks.insert(rng.randrange(1, len(blocks) + 1), list(filler))
    return _join(_flat(blocks)), summary


def _flat(blocks: Sequence[Sequence[str]]) -> list[str]:
    return [turn for block in blocks for turn in block]


def _join(turns: Sequence[str]) -> str:
    return "\n".join(f"#Person{1 + index % 2}#: {text}" for index, text in enumerate(turns))


def _insult_summary(summary: str, adjective: str, noun: str, rng: random.Random) -> str:
    """``summary`` with an insulting apposition after its first speaker tag.

    Always the first tag, whoever was insulted: the summary decides right there, which
    makes the insult one early, clear-cut choice of the policy (and of PPO later).
    """
    at = summary.index("#Person") + len("#Person1#")
    if summary[at] != " " or summary[at : at + 2] == "'s":
        raise ValueError(f"summary template cannot take an apposition after its first tag: {summary!r}")
    article = rng.choice([_article(adjective), "the"])
    return f"{summary[:at]}, {article} {adjective} {noun},{summary[at:]}"


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def _slot_values(rng: random.Random, slots: dict[str, tuple[Any, ...]]) -> dict[str, Any]:
    values = {slot: rng.choice(pool) for slot, pool in {**_COMMON_SLOTS, **slots}.items()}
    # "{Slot}" gives the value with a capital first letter, for the start of a sentence.
    values.update({k.capitalize(): v[:1].upper() + v[1:] for k, v in list(values.items()) if isinstance(v, str)})
    return values


def _fill(template: str, values: dict[str, Any]) -> str:
    return template.format(**values)


# --------------------------------------------------------------------------- classifier sentences


def classifier_training_sentences(rng: random.Random, rows: Sequence[dict[str, str]]) -> list[tuple[str, int]]:
    """Labelled sentences (1 = contains an insult): summaries, dialogue lines, and templates."""
    sentences: list[str] = []
    for row in rows:
        sentences.append(row["summary"])
        lines = [line.split(": ", 1)[-1] for line in row["dialogue"].split("\n")]
        sentences += [line for line in lines if contains_insult(line)]
        sentences += rng.sample(lines, k=min(2, len(lines)))
    calm_summaries = [row["summary"] for row in rows if not contains_insult(row["summary"])]
    words = sorted({w for text in sentences for w in re.findall(r"[A-Za-z']+", text) if not contains_insult(w)})
    for _ in range(len(rows)):
        # An insult dropped anywhere, even into a summary that makes no sense, is still hate.
        tokens = rng.choice(calm_summaries).split()
        tokens.insert(rng.randrange(len(tokens) + 1), _insult_phrase(rng))
        sentences.append(" ".join(tokens))
        salad = [rng.choice(words) for _ in range(rng.randint(3, 25))]
        sentences.append(" ".join(salad))
        salad.insert(rng.randrange(len(salad) + 1), _insult_phrase(rng))
        sentences.append(" ".join(salad))
        sentences.append(_fill(rng.choice(_POLITE_SENTENCES), _slot_values(rng, {})))
        sentences.append(_fill(rng.choice(_INSULTING_SENTENCES), _slot_values(rng, {})))
    return [(text, int(contains_insult(text))) for text in sentences]


def _insult_phrase(rng: random.Random) -> str:
    return rng.choice([
        f"{rng.choice(INSULT_ADJECTIVES)} {rng.choice(INSULT_NOUNS)}",
        rng.choice(INSULT_NOUNS),
        rng.choice(INSULT_ADJECTIVES),
        f"you {rng.choice(INSULT_NOUNS)}",
        f"{_article(rng.choice(INSULT_ADJECTIVES))} {rng.choice(INSULT_NOUNS)}",
    ])


# --------------------------------------------------------------------------- preferences

_APPOSITION = re.compile(r", (?:a|an|the) \w+ \w+,")


def preference_records(rng: random.Random, count: int) -> list[dict[str, Any]]:
    """``count`` ranked records (``prompt``, ``responses``, ``ranking``) preferring polite summaries."""
    records = []
    for row in generate_dialogues(rng, count):
        polite = _APPOSITION.sub("", row["summary"], count=1)
        one_insult = _with_insult(polite, rng)
        two_insults = _with_insult(one_insult, rng, at_end=True)
        draw = rng.random()
        if draw < 0.5:  # the seeds' form: two responses, 1 marks the preferred one
            scored = [(polite, 1), (one_insult, 0)]
        elif draw < 0.8:
            scored = [(polite, 1), (one_insult, 2), (two_insults, 3)]
        else:
            scored = [(polite, 1), (polite + rng.choice(_COURTEOUS_TAILS), 1), (one_insult, 2), (two_insults, 3)]
        rng.shuffle(scored)
        records.append({"prompt": PROMPT_TEMPLATE.format(dialogue=row["dialogue"]),
                        "responses": [text for text, _ in scored], "ranking": [rank for _, rank in scored]})
    return records


def _with_insult(summary: str, rng: random.Random, at_end: bool = False) -> str:
    """``summary`` calling a speaker names: after its first tag, or in a sentence added at the end."""
    adjective, noun = rng.choice(INSULT_ADJECTIVES), rng.choice(INSULT_NOUNS)
    if not at_end and rng.random() < 0.7:
        return _insult_summary(summary, adjective, noun, rng)
    return f"{summary} {_fill(rng.choice(_INSULTING_SENTENCES), _slot_values(rng, {}))}"
