"""Fact files (JSONL, CSV), the packaged default suite, and their tokenisation."""
import csv
import json
from dataclasses import asdict

import pytest
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import AutoConfig, AutoTokenizer, PreTrainedTokenizerFast

from mlx_lens.experiment import single
from mlx_lens.core.errors import LensError
from mlx_lens.experiment.facts import TEMPLATES, EncodedFact, Fact, encode_facts, load_facts

FULL = {"id": "de", "prompt": "The capital of Germany is called simply", "answer": "Berlin",
        "group": "capitals", "control_prompt": "The capital of France is called simply",
        "control_answer": "Paris", "cluster": "Germany", "subject": "Germany"}
BARE = {"prompt": "The capital of Spain is called simply", "answer": "Madrid"}
NONE = {"group": "", "control_prompt": None, "control_answer": None, "cluster": "", "subject": ""}


def loaded(tmp_path, monkeypatch, name, content):
    """load_facts on a file written in tmp_path, named as a user in that folder names it."""
    monkeypatch.chdir(tmp_path)
    path = tmp_path / name
    path.write_bytes(content) if isinstance(content, bytes) else path.write_text(content)
    return load_facts(name)


def fact_fields(fact):
    return {k: v for k, v in asdict(fact).items() if k != "source"}


def test_jsonl_round_trip(tmp_path, monkeypatch):
    lines = [json.dumps(FULL), "", json.dumps(BARE), json.dumps({**BARE, "id": 7, "extra": [1]}),
             "   ", json.dumps({**FULL, "id": "fr", "control_prompt": None,
                                "control_answer": None})]
    facts = loaded(tmp_path, monkeypatch, "facts.jsonl", "\n".join(lines) + "\n")
    assert [fact_fields(f) for f in facts] == [
        FULL,
        {**BARE, "id": "fact-2", **NONE}, {**BARE, "id": "7", **NONE},
        {**FULL, "id": "fr", "control_prompt": None, "control_answer": None},
    ]
    assert [f.source for f in facts] == ["facts.jsonl:1", "facts.jsonl:3", "facts.jsonl:4",
                                         "facts.jsonl:6"]


def test_jsonl_keeps_text_that_splitlines_would_split(tmp_path, monkeypatch):
    prompt = "Line\u2028separated prompt"
    facts = loaded(tmp_path, monkeypatch, "facts.jsonl",
                   json.dumps({"prompt": prompt, "answer": " Rome "}, ensure_ascii=False))
    assert (facts[0].prompt, facts[0].answer) == (prompt, "Rome")


def test_csv_round_trip(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    columns = list(FULL) + ["notes"]
    rows = [FULL, {**BARE, "prompt": "A prompt, with a comma and\na line break"},
            {**BARE, "id": "es", "group": "g"}]
    with open(tmp_path / "facts.csv", "w", newline="", encoding="utf-8-sig") as f:
        writer = csv.DictWriter(f, columns)
        writer.writeheader()
        writer.writerows(rows)
        f.write("\r\n")  # a blank line is skipped
        writer.writerow({**FULL, "id": "last"})
    facts = load_facts("facts.csv")
    assert [fact_fields(f) for f in facts] == [
        FULL, {**rows[1], "id": "fact-2", **NONE},
        {**BARE, "id": "es", **NONE, "group": "g"}, {**FULL, "id": "last"}]
    # The line a row starts on, as an editor shows it (the quoted break spans lines 3 and 4).
    assert [f.source for f in facts] == ["facts.csv:2", "facts.csv:3", "facts.csv:5",
                                         "facts.csv:7"]


def test_csv_with_required_columns_only(tmp_path, monkeypatch):
    facts = loaded(tmp_path, monkeypatch, "facts.csv", "answer,prompt\nMadrid,Spain's capital is\n")
    assert facts == [Fact(id="fact-1", prompt="Spain's capital is", answer="Madrid",
                          source="facts.csv:2")]


def test_default_suite():
    facts = load_facts("default")
    groups = {}
    for fact in facts:
        groups.setdefault(fact.group, []).append(fact)
    assert list(groups) == list(TEMPLATES) == ["original", "capital_city_named",
                                               "country_has_capital"]
    assert all(len(group) >= 100 for group in groups.values())
    assert len({f.id for f in facts}) == len(facts)
    assert all(f.control_prompt and f.control_answer for f in facts)
    assert all(f.answer == f.answer.strip() and f.answer for f in facts)
    by_id = {f.id: f for f in facts}
    germany = by_id["original/Germany"]
    assert germany == Fact(
        id="original/Germany",
        prompt="Give the city name only, plain text. The capital of Germany is called simply",
        answer="Berlin", group="original",
        control_prompt="Give the city name only, plain text. The capital of France is called "
                       "simply", control_answer="Paris", source="default:Germany",
        cluster="Germany", subject="Germany")
    # A country's facts, one per template, are one cluster (the bootstrap's unit); a fact of a
    # file without clusters is its own.
    clusters = {}
    for fact in facts:
        clusters.setdefault(fact.cluster_key, []).append(fact.group)
    assert len(clusters) == len(facts) // 3
    assert all(sorted(g) == sorted(TEMPLATES) for g in clusters.values())
    assert Fact("x", "p", "a").cluster_key == "x"
    assert by_id["country_has_capital/Germany"].control_prompt == (
        "Give the city name only, plain text. France has its capital at the city called simply")
    # Controls wrap around: the last country's control is the first's.
    for group in groups.values():
        assert (group[-1].control_prompt, group[-1].control_answer) == (group[0].prompt,
                                                                         group[0].answer)
        assert [f.control_answer for f in group[:-1]] == [f.answer for f in group[1:]]


JSONL_CASES = [
    ('{"prompt": "a", "answer": "b"}\n{"prompt": "a" "answer": "b"}\n',
     "facts.jsonl:2: bad JSON (Expecting ',' delimiter)"),
    ('["a", "b"]\n', "facts.jsonl:1: expected a JSON object, not an array"),
    ('{"prompt": "a", "answer": "b"}\n\n{"prompt": "a"}\n', "facts.jsonl:3: missing field 'answer'"),
    ('{"answer": "b"}\n', "facts.jsonl:1: missing field 'prompt'"),
    ('{"prompt": " \\t", "answer": "b"}\n', "facts.jsonl:1: empty prompt"),
    ('{"prompt": "a", "answer": ""}\n', "facts.jsonl:1: empty answer"),
    ('{"prompt": "a", "answer": null}\n', "facts.jsonl:1: field 'answer' must be a string, not null"),
    ('{"prompt": 3, "answer": "b"}\n', "facts.jsonl:1: field 'prompt' must be a string, not a number"),
    ('{"prompt": "a", "answer": "b", "control_prompt": "c"}\n',
     "facts.jsonl:1: control_prompt given without control_answer"),
    ('{"prompt": "a", "answer": "b", "control_answer": "c", "control_prompt": null}\n',
     "facts.jsonl:1: control_answer given without control_prompt"),
    ('{"prompt": "a", "answer": "b", "control_prompt": "", "control_answer": "c"}\n',
     "facts.jsonl:1: empty control_prompt"),
    ('{"prompt": "a", "answer": "b", "control_prompt": "c", "control_answer": " "}\n',
     "facts.jsonl:1: empty control_answer"),
    ('{"prompt": "a", "answer": "b", "id": true}\n',
     "facts.jsonl:1: field 'id' must be a string or an integer, not a boolean"),
    ('{"prompt": "a", "answer": "b", "id": 1.5}\n',
     "facts.jsonl:1: field 'id' must be a string or an integer, not a number"),
    ('{"prompt": "a", "answer": "b", "id": ""}\n', "facts.jsonl:1: empty id"),
    ('{"prompt": "a", "answer": "b", "group": ["g"]}\n',
     "facts.jsonl:1: field 'group' must be a string, not an array"),
    ('{"prompt": "a", "answer": "b", "cluster": 3}\n',
     "facts.jsonl:1: field 'cluster' must be a string, not a number"),
    ('{"prompt": "a", "answer": "b", "group": "all"}\n',
     "facts.jsonl:1: group 'all' is reserved (the aggregates over every fact)"),
    ('\n{"prompt": "a", "answer": "b", "id": 7}\n{"prompt": "c", "answer": "d", "id": "7"}\n',
     "facts.jsonl:3: duplicate id '7' (first on line 2)"),
    ('{"prompt": "a", "answer": "b", "id": "fact-2"}\n{"prompt": "c", "answer": "d"}\n',
     "facts.jsonl:2: duplicate id 'fact-2' (first on line 1)"),
    (b'{"prompt": "a", "answer": "b"}\n{"prompt": "\xff", "answer": "b"}\n',
     "facts.jsonl:2: not UTF-8 text (byte 0xff)"),
    ("", "facts.jsonl: no facts in the file"),
    ("\n  \n\n", "facts.jsonl: no facts in the file"),
]
CSV_CASES = [
    ("prompt,answer\np,a\nq\n", "facts.csv:3: missing field 'answer'"),
    ("prompt,group\np,g\n", "facts.csv:1: no 'answer' column in the header"),
    ("\nanswer\na\n", "facts.csv:2: no 'prompt' column in the header"),
    ("prompt,answer,prompt\np,a,q\n", "facts.csv:1: duplicate column 'prompt'"),
    ("prompt,answer\nThe capital of France, the country, is,Paris\n",
     "facts.csv:2: 4 fields, but the header on line 1 has 2 (quote a field that holds a comma)"),
    ('prompt,answer\n"The capital" of France,Paris\n',
     "facts.csv:2: bad CSV (',' expected after '\"')"),
    ('prompt,answer\np,a\n"unclosed,b\n', "facts.csv:3: bad CSV (unexpected end of data)"),
    ("prompt,answer\n,Paris\n", "facts.csv:2: empty prompt"),
    ('prompt,answer\n"two\nlines",a\n  ,b\n', "facts.csv:4: empty prompt"),
    ("prompt,answer\np, \n", "facts.csv:2: empty answer"),
    ("prompt,answer,control_prompt,control_answer\np,a,,c\n",
     "facts.csv:2: control_answer given without control_prompt"),
    ("prompt,answer,control_prompt,control_answer\np,a,c,\n",
     "facts.csv:2: control_prompt given without control_answer"),
    ("id,prompt,answer\nx,p,a\n\ny,q,b\nx,r,c\n", "facts.csv:5: duplicate id 'x' (first on line 2)"),
    ("prompt,answer\n", "facts.csv: no facts in the file"),
    ("", "facts.csv: no facts in the file"),
]


@pytest.mark.parametrize("name, content, message",
                         [("facts.jsonl", *case) for case in JSONL_CASES]
                         + [("facts.csv", *case) for case in CSV_CASES])
def test_bad_file_is_one_line_with_its_line(tmp_path, monkeypatch, name, content, message):
    with pytest.raises(LensError) as error:
        loaded(tmp_path, monkeypatch, name, content)
    assert str(error.value) == message


def test_unreadable_files(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "folder.csv").mkdir()
    (tmp_path / "facts.txt").write_text(json.dumps(BARE))
    for spec, message in [("missing.jsonl", "missing.jsonl: cannot read the file (No such file "
                                            "or directory)"),
                          ("folder.csv", "folder.csv: cannot read the file (Is a directory)"),
                          ("facts.txt", "facts.txt: a facts file must end in .jsonl or .csv"),
                          ("facts", "facts: a facts file must end in .jsonl or .csv")]:
        with pytest.raises(LensError) as error:
            load_facts(spec)
        assert str(error.value) == message


@pytest.fixture(scope="module")
def llama(tiny_model_dirs):
    path = str(tiny_model_dirs["llama"])
    return AutoTokenizer.from_pretrained(path), AutoConfig.from_pretrained(path).max_position_embeddings


def test_encode_facts_as_the_experiment_does(llama, tmp_path, monkeypatch):
    tok, n_ctx = llama
    facts = loaded(tmp_path, monkeypatch, "facts.jsonl",
                   "\n".join(json.dumps(r) for r in (FULL, BARE)))
    encoded = encode_facts(facts, tok, n_ctx)
    full_ids = single.encode_prompt(tok, FULL["prompt"], n_ctx)
    control_ids = single.encode_prompt(tok, FULL["control_prompt"], n_ctx)
    bare_ids = single.encode_prompt(tok, BARE["prompt"], n_ctx)
    assert encoded == [
        EncodedFact(facts[0], full_ids,
                    tuple(single.answer_token_ids(tok, full_ids, FULL["prompt"], "Berlin")),
                    control_ids,
                    tuple(single.answer_token_ids(tok, control_ids, FULL["control_prompt"],
                                                  "Paris")),
                    single.answer_token_id(tok, control_ids, FULL["control_prompt"], "Berlin"),
                    single.subject_span(tok, full_ids, "Germany")),
        EncodedFact(facts[1], bare_ids,
                    tuple(single.answer_token_ids(tok, bare_ids, BARE["prompt"], "Madrid"))),
    ]
    # The tiny tokenizer merges " Berlin" and " Paris" into single tokens.
    assert tok.decode([encoded[0].answer_id]) == " Berlin"
    assert tok.decode([encoded[0].control_answer_id]) == " Paris"
    assert encoded[0].answer_in_control_id == encoded[0].answer_id


def test_encode_errors_name_the_fact(llama, tmp_path, monkeypatch):
    tok, n_ctx = llama
    long = "word " * 200
    facts = loaded(tmp_path, monkeypatch, "facts.jsonl", "\n".join(json.dumps(r) for r in (
        BARE, {**BARE, "id": "long", "prompt": long}, {**FULL, "control_prompt": long})))
    n_long = len(tok.encode(long))
    assert n_long > n_ctx == 128
    too_long = f"the prompt is {n_long} tokens, longer than the model's context of 128 tokens"
    for fact, line in ((facts[1], 2), (facts[2], 3)):
        with pytest.raises(LensError) as error:
            encode_facts([facts[0], fact], tok, n_ctx)
        assert str(error.value) == f"facts.jsonl:{line}: {too_long}"


def word_tokenizer(text):
    """A word-level tokenizer that knows text's words only: anything else is its unknown token
    (the tiny byte-level BPE encodes every string)."""
    vocab = {"[UNK]": 0, **{w: i for i, w in enumerate(dict.fromkeys(text.split()), 1)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]")


def test_unencodable_answers_name_the_fact(tmp_path, monkeypatch):
    tok = word_tokenizer("The capital of China France is called simply Paris")
    rows = [{"id": "cn", "prompt": "The capital of China is called simply", "answer": "北京"},
            {"prompt": "The capital of France is called simply", "answer": "Paris",
             "control_prompt": "The capital of China is called simply", "control_answer": "北京"}]
    facts = loaded(tmp_path, monkeypatch, "capitals.jsonl", "\n".join(json.dumps(r) for r in rows))
    for fact, line in zip(facts, (1, 2)):
        with pytest.raises(LensError) as error:
            encode_facts([fact], tok, None)
        assert str(error.value) == (f"capitals.jsonl:{line}: the tokenizer cannot encode the "
                                    "answer '北京'")
    default = Fact(id="original/China", prompt=rows[0]["prompt"], answer="北京",
                   source="default:China")
    with pytest.raises(LensError, match=r"^default:China: the tokenizer cannot encode"):
        encode_facts([default], tok, None)


def test_default_suite_encodes_with_smollm2(smollm2_dir):
    tok = AutoTokenizer.from_pretrained(str(smollm2_dir))
    n_ctx = AutoConfig.from_pretrained(str(smollm2_dir)).max_position_embeddings
    encoded = encode_facts(load_facts("default"), tok, n_ctx)
    assert len(encoded) == len(load_facts("default"))
    # A control only means something if its answer and the fact's differ in their first token.
    assert all(e.control_answer_id != e.answer_in_control_id for e in encoded)
    by_id = {e.fact.id: e for e in encoded}
    assert tok.decode([by_id["original/Germany"].answer_id]) == " Berlin"
    assert tok.decode([by_id["original/Germany"].control_answer_id]) == " Paris"
