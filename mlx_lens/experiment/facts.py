"""The facts of a fact suite (`mlx-lens run --facts FILE`): read from JSONL or CSV, or the packaged
default suite, and tokenised for a model.

A file's problems are LensErrors of one line, "FILE:LINE: problem", so that the CLI can print
them as they are.
"""
from __future__ import annotations

import csv
import io
import json
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from mlx_lens.output.suite_tables import ALL
from mlx_lens.experiment import single
from mlx_lens.core.errors import LensError

DEFAULT = "default"  # the spec that names the packaged suite
DEFAULT_DATA = "data/capitals.csv"  # columns country,capital, inside the mlx_lens package

# The default suite asks each capital three ways, so that a layer's behaviour can be told apart
# from one wording's quirks; "original" is the original experiment's prompt.
TEMPLATES = {
    "original": "Give the city name only, plain text. The capital of {country} is called simply",
    "capital_city_named":
        "Give the city name only, plain text. The capital city of {country} is named simply",
    "country_has_capital":
        "Give the city name only, plain text. {country} has its capital at the city called simply",
}
# A default fact's control is the next country in the data file (wrapping around) in the same
# template: the original's negative control (Germany's is France -> Paris) for every fact. A
# country's three facts are one cluster: the bootstrap draws countries, not facts.
CONTROL_OFFSET = 1

REQUIRED = ("prompt", "answer")


@dataclass(frozen=True)
class Fact:
    id: str
    prompt: str
    answer: str
    group: str = ""
    control_prompt: str | None = None
    control_answer: str | None = None
    source: str = ""  # "FILE:LINE", the prefix of this fact's messages
    # facts of one cluster are not independent (one subject asked several ways): the bootstrap
    # draws them together; "" a cluster of its own
    cluster: str = ""
    # the words of the prompt a causal trace noises (mlx_lens/experiment/tracing.py); "" none
    subject: str = ""

    @property
    def cluster_key(self) -> str:
        return self.cluster or self.id


@dataclass(frozen=True)
class EncodedFact:
    fact: Fact
    ids: list[int]
    answer_ids: tuple[int, ...]  # the answer's tokens after the prompt
    control_ids: list[int] | None = None
    control_answer_ids: tuple[int, ...] | None = None  # the control answer's, after control_ids
    answer_in_control_id: int | None = None  # the fact's own answer's first token there
    subject_span: tuple[int, int] | None = None  # the subject's tokens in ids: [start, stop)

    @property
    def answer_id(self) -> int:
        return self.answer_ids[0]

    @property
    def control_answer_id(self) -> int | None:
        return self.control_answer_ids[0] if self.control_answer_ids else None


def load_facts(spec: str) -> list[Fact]:
    """The facts of a .jsonl or .csv file, or of the packaged suite when spec is "default"."""
    if spec == DEFAULT:
        return default_facts()
    readers = {".jsonl": _jsonl_records, ".csv": _csv_records}
    suffix = Path(spec).suffix.lower()
    if suffix not in readers:
        raise LensError(f"{spec}: a facts file must end in .jsonl or .csv")
    facts: list[Fact] = []
    first_line: dict[str, int] = {}
    for line, record in readers[suffix](spec, _read_text(spec)):
        fact = _fact(record, f"{spec}:{line}", len(facts) + 1)
        if fact.id in first_line:
            raise LensError(f"{spec}:{line}: duplicate id {fact.id!r} "
                            f"(first on line {first_line[fact.id]})")
        first_line[fact.id] = line
        facts.append(fact)
    if not facts:
        raise LensError(f"{spec}: no facts in the file")
    return facts


def default_facts() -> list[Fact]:
    """Every country of the packaged data file in every template, template by template."""
    text = resources.files("mlx_lens").joinpath(DEFAULT_DATA).read_text(encoding="utf-8")
    rows = [(row["country"], row["capital"]) for row in csv.DictReader(io.StringIO(text))]
    facts = []
    for group, template in TEMPLATES.items():
        for i, (country, capital) in enumerate(rows):
            other_country, other_capital = rows[(i + CONTROL_OFFSET) % len(rows)]
            facts.append(Fact(id=f"{group}/{country}", prompt=template.format(country=country),
                              answer=capital, group=group,
                              control_prompt=template.format(country=other_country),
                              control_answer=other_capital, source=f"{DEFAULT}:{country}",
                              cluster=country, subject=country))
    return facts


def encode_facts(facts: list[Fact], tokenizer, n_ctx: int | None) -> list[EncodedFact]:
    """Token ids of every fact's prompt and answer (and its control's), as the single-prompt
    experiment computes them; a problem names the fact's source."""
    return [_encode(fact, tokenizer, n_ctx) for fact in facts]


def _encode(fact: Fact, tokenizer, n_ctx: int | None) -> EncodedFact:
    try:
        ids, answer = single.encode_prompt_and_answer(tokenizer, fact.prompt, fact.answer,
                                                      n_ctx)
        span = (single.subject_span(tokenizer, ids, fact.subject) if fact.subject else None)
        if fact.control_prompt is None:
            return EncodedFact(fact, ids, tuple(answer), subject_span=span)
        control_ids, control = single.encode_prompt_and_answer(
            tokenizer, fact.control_prompt, fact.control_answer, n_ctx)
        return EncodedFact(fact, ids, tuple(answer), control_ids, tuple(control),
                           single.answer_token_id(tokenizer, control_ids, fact.control_prompt,
                                                  fact.answer), span)
    except LensError as e:
        raise LensError(f"{fact.source or fact.id}: {e}") from e


def _read_text(spec: str) -> str:
    try:
        data = Path(spec).read_bytes()
    except OSError as e:
        raise LensError(f"{spec}: cannot read the file ({e.strerror or e})") from e
    try:
        return data.decode("utf-8-sig")  # -sig: spreadsheets often write a byte-order mark
    except UnicodeDecodeError as e:
        line = data[:e.start].count(b"\n") + 1
        raise LensError(f"{spec}:{line}: not UTF-8 text (byte 0x{data[e.start]:02x})") from e


def _jsonl_records(spec: str, text: str):
    """(line, object) per non-empty line."""
    # Lines end at "\n" only: a JSON string may hold U+2028 and the like, which splitlines()
    # would also split at.
    for line, raw in enumerate(text.split("\n"), 1):
        if not raw.strip():
            continue
        try:
            record = json.loads(raw)
        except json.JSONDecodeError as e:
            raise LensError(f"{spec}:{line}: bad JSON ({e.msg})") from e
        if not isinstance(record, dict):
            raise LensError(f"{spec}:{line}: expected a JSON object, not {_json_type(record)}")
        yield line, record


def _csv_records(spec: str, text: str):
    """(line, {column: cell}) per data row; line is the row's first line in the file. An empty
    cell of an optional column is left out: CSV cannot tell it from a value not given."""
    # newline="": quoted fields may hold line breaks; strict: a stray quote is an error, not text.
    reader = csv.reader(io.StringIO(text, newline=""), strict=True)
    header: list[str] | None = None
    header_line = 0
    while True:
        start = reader.line_num + 1
        try:
            row = next(reader)
        except StopIteration:
            return
        except csv.Error as e:
            raise LensError(f"{spec}:{start}: bad CSV ({e})") from e
        if not row:  # a blank line
            continue
        if header is None:
            header, header_line = row, start
            _check_header(spec, start, header)
            continue
        if len(row) > len(header):
            raise LensError(f"{spec}:{start}: {len(row)} fields, but the header on line "
                            f"{header_line} has {len(header)} (quote a field that holds a comma)")
        yield start, {column: cell for column, cell in zip(header, row)
                      if cell or column in REQUIRED}


def _check_header(spec: str, line: int, header: list[str]) -> None:
    seen = set()
    for column in header:
        if column in seen:
            raise LensError(f"{spec}:{line}: duplicate column {column!r}")
        seen.add(column)
    for column in REQUIRED:
        if column not in seen:
            raise LensError(f"{spec}:{line}: no {column!r} column in the header")


def _fact(record: dict, source: str, index: int) -> Fact:
    """A Fact from one record's fields (unknown ones ignored); index is 1-based."""
    def text(key: str, required: bool = False) -> str | None:
        if key not in record or (record[key] is None and not required):
            if required:
                raise LensError(f"{source}: missing field {key!r}")
            return None
        value = record[key]
        if not isinstance(value, str):
            raise LensError(f"{source}: field {key!r} must be a string, not {_json_type(value)}")
        if not value.strip():
            raise LensError(f"{source}: empty {key}")
        return value

    prompt, answer = text("prompt", True), text("answer", True)
    control_prompt, control_answer = text("control_prompt"), text("control_answer")
    subject = text("subject")
    if subject is not None and subject.strip() not in prompt:
        raise LensError(f"{source}: the subject {subject.strip()!r} is not in the prompt")
    if (control_prompt is None) != (control_answer is None):
        given, missing = (("control_prompt", "control_answer") if control_answer is None
                          else ("control_answer", "control_prompt"))
        raise LensError(f"{source}: {given} given without {missing}")
    fact_id = record.get("id")
    if fact_id is None:
        fact_id = f"fact-{index}"
    elif isinstance(fact_id, int) and not isinstance(fact_id, bool):
        fact_id = str(fact_id)
    elif not isinstance(fact_id, str):
        raise LensError(f"{source}: field 'id' must be a string or an integer, "
                        f"not {_json_type(fact_id)}")
    elif not fact_id.strip():
        raise LensError(f"{source}: empty id")
    group = record.get("group")
    if group is not None and not isinstance(group, str):
        raise LensError(f"{source}: field 'group' must be a string, not {_json_type(group)}")
    cluster = record.get("cluster")
    if cluster is not None and not isinstance(cluster, str):
        raise LensError(f"{source}: field 'cluster' must be a string, not {_json_type(cluster)}")
    if group == ALL:
        raise LensError(f"{source}: group '{ALL}' is reserved (the aggregates over "
                        "every fact)")
    # Answers are words to score, whose leading space answer_token_id supplies (it strips them
    # too): the tables record the word scored, not a CSV comma's space.
    return Fact(id=fact_id, prompt=prompt, answer=answer.strip(), group=group or "",
                control_prompt=control_prompt,
                control_answer=None if control_answer is None else control_answer.strip(),
                source=source, cluster=cluster or "", subject=(subject or "").strip())


def _json_type(value) -> str:
    """The JSON name of a decoded value's type, for messages."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, (int, float)):
        return "a number"
    if isinstance(value, str):
        return "a string"
    return "an array" if isinstance(value, list) else "an object"
