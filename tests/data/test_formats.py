"""Reading rows from every file type, normalizing every row format, and errors a person can act on."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from lorakit.data import DataError
from lorakit.data.formats import ACCEPTED, load_records, read_rows

ROWS = [
    {"instruction": "Add the numbers.", "input": "2 and 3", "output": "5"},
    {"instruction": "Say hi.", "output": "hi"},
    {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi?"},
                  {"role": "assistant", "content": "Hello."}]},
    {"prompt": "2+2=", "completion": "4"},
    {"text": "The cat sat on the mat."},
]


def write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return path


def check_normalized(records) -> None:
    alpaca, bare, chat, completion, text = records
    assert alpaca.format == "chat" and alpaca.messages == [
        {"role": "user", "content": "Add the numbers.\n\n2 and 3"}, {"role": "assistant", "content": "5"}]
    assert bare.messages == [{"role": "user", "content": "Say hi."}, {"role": "assistant", "content": "hi"}]
    assert chat.format == "chat" and chat.messages == ROWS[2]["messages"]
    assert (completion.format, completion.prompt, completion.response) == ("completion", "2+2=", "4")
    assert (text.format, text.prompt, text.response) == ("text", "", "The cat sat on the mat.")


def test_jsonl_rows_of_every_format_are_normalized_with_their_line(tmp_path) -> None:
    path = tmp_path / "train.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in ROWS[:2]) + "\n\n   \n" + "\n".join(json.dumps(r) for r in ROWS[2:]))
    records = load_records(str(path))
    check_normalized(records)
    assert [r.origin for r in records] == [f"{path}:{n}" for n in (1, 2, 5, 6, 7)]  # blank lines skipped, still counted


def test_json_list_and_data_object(tmp_path) -> None:
    (tmp_path / "a.json").write_text(json.dumps(ROWS, indent=2))
    (tmp_path / "b.json").write_text(json.dumps({"data": ROWS}))
    for name in ("a.json", "b.json"):
        records = load_records(str(tmp_path / name))
        check_normalized(records)
        assert records[3].origin == f"{tmp_path / name}:row 3"


def test_csv_with_alpaca_columns_and_a_multiline_field(tmp_path) -> None:
    path = tmp_path / "train.csv"
    path.write_text('instruction,input,output\nAdd the numbers.,2 and 3,5\n"Say hi,\nthen stop.",,"hi\n\nbye"\nx,,y\n')
    records = load_records(str(path))
    assert records[0].messages[0]["content"] == "Add the numbers.\n\n2 and 3"
    assert records[1].messages == [{"role": "user", "content": "Say hi,\nthen stop."},  # line breaks kept,
                                   {"role": "assistant", "content": "hi\n\nbye"}]  # an empty input ignored
    assert [r.origin for r in records] == [f"{path}:2", f"{path}:3", f"{path}:7"]  # the line each row starts on


def test_parquet(tmp_path) -> None:
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    path = tmp_path / "train.parquet"
    pq.write_table(pa.Table.from_pylist([{"prompt": "2+2=", "completion": "4"}, {"prompt": "3+3=", "completion": "6"}]), path)
    records = load_records(str(path))
    assert [(r.prompt, r.response, r.origin) for r in records] == [("2+2=", "4", f"{path}:row 0"), ("3+3=", "6", f"{path}:row 1")]
    path.write_bytes(b"PAR1 not really")
    with pytest.raises(DataError, match=r"train\.parquet: not a readable parquet file"):
        read_rows(str(path))


def test_directory_reads_every_data_file_in_name_order(tmp_path) -> None:
    write_jsonl(tmp_path / "b.jsonl", ROWS[2:])
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "c.json").write_text(json.dumps([{"text": "from json"}]))
    write_jsonl(tmp_path / "a.jsonl", ROWS[:2])
    (tmp_path / "README.md").write_text("not data")
    records = load_records(str(tmp_path))
    check_normalized(records[:5])
    assert records[5].response == "from json" and len(records) == 6
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match=r"empty: directory holds no \.jsonl/\.json/\.csv/\.parquet files"):
        read_rows(str(tmp_path / "empty"))


def test_jsonl_keeps_unicode_line_separators_inside_strings(tmp_path) -> None:
    """JSON strings may hold U+2028/U+2029 raw; str.splitlines() would cut the line there."""
    path = write_jsonl(tmp_path / "t.jsonl", [{"text": "one\u2028two\u2029three\x85four"}, {"text": "next"}])
    assert [r.response for r in load_records(str(path))] == ["one\u2028two\u2029three\x85four", "next"]
    path.write_bytes(b'\xef\xbb\xbf{"text": "bom"}\r\n{"text": "crlf"}\r\n')  # a BOM and Windows line ends
    assert [(r.response, r.origin) for r in load_records(str(path))] == [("bom", f"{path}:1"), ("crlf", f"{path}:2")]


# --------------------------------------------------------------------------- errors


def test_malformed_jsonl_line_names_file_and_line(tmp_path) -> None:
    path = tmp_path / "train.jsonl"
    path.write_text('{"text": "ok"}\n{"text": "ok"}\n{"text": "missing quote}\n')
    with pytest.raises(DataError) as err:
        load_records(str(path))
    assert str(err.value).startswith(f"{path}:3: not valid JSON")
    assert "each line must be one JSON object" in str(err.value)


def test_missing_field_lists_the_fields_found_and_the_formats_accepted(tmp_path) -> None:
    path = write_jsonl(tmp_path / "train.jsonl", [{"text": "fine"}, {"question": "q", "answer": "a"}])
    with pytest.raises(DataError) as err:
        load_records(str(path))
    message = str(err.value)
    assert message.startswith(f"{path}:2: cannot tell the row format")
    assert "['answer', 'question']" in message and ACCEPTED in message
    with pytest.raises(DataError, match=re.escape("data.format is alpaca but the row lacks ['instruction', 'output']")):
        load_records(str(path), declared="alpaca")


@pytest.mark.parametrize(("name", "content"), [("e.jsonl", ""), ("e.jsonl", "\n  \n"), ("e.json", ""), ("e.json", "[]"),
                                               ("e.csv", ""), ("e.csv", "text\n")])
def test_empty_files(tmp_path, name: str, content: str) -> None:
    (tmp_path / name).write_text(content)
    with pytest.raises(DataError, match=rf"{name}: the file is empty \(no rows\)"):
        load_records(str(tmp_path / name))


def test_bad_encoding_names_the_line_and_byte(tmp_path) -> None:
    path = tmp_path / "latin1.jsonl"
    path.write_bytes('{"text": "ok"}\n{"text": "café"}\n'.encode("latin-1"))
    with pytest.raises(DataError) as err:
        load_records(str(path))
    assert str(err.value).startswith(f"{path}:2: not UTF-8 text")
    assert "b'\\xe9'" in str(err.value) and "re-save the file as UTF-8" in str(err.value)


@pytest.mark.parametrize(("row", "message"), [
    ({"messages": [{"role": "user", "content": 5}]}, "messages[0].content must be a string, got int"),
    ({"messages": [{"role": "user", "content": [{"type": "text", "text": "hi"}]}]}, "messages[0].content must be a string, got list"),
    ({"instruction": "x", "output": None}, "field 'output' must be a string, got NoneType"),
    ({"text": 3.5}, "field 'text' must be a string, got float"),
    ({"messages": [{"role": "user", "content": "a"}, {"role": "human", "content": "b"}]},
     "messages[1] has unknown role 'human'; roles: system, user, assistant"),
    ({"messages": [{"from": "human", "value": "b"}]}, "messages[0] must be an object with 'role' and 'content'"),
    ({"messages": []}, "'messages' must be a non-empty list"),
    (["a", "list"], "each row must be a JSON object with named fields, got list"),
])
def test_bad_rows_get_clear_errors(tmp_path, row, message: str) -> None:
    path = write_jsonl(tmp_path / "train.jsonl", [{"text": "fine"}, row])
    with pytest.raises(DataError) as err:
        load_records(str(path))
    assert str(err.value).startswith(f"{path}:2: ") and message in str(err.value)


def test_missing_and_unsupported_files(tmp_path) -> None:
    with pytest.raises(DataError, match="data file .*nope.jsonl does not exist"):
        read_rows(str(tmp_path / "nope.jsonl"))
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(DataError, match=r"notes\.txt: unsupported file type '\.txt'; use one of \.jsonl, \.json"):
        read_rows(str(tmp_path / "notes.txt"))
    (tmp_path / "bad.json").write_text('[{"text": "a"},\n {"text": }]')
    with pytest.raises(DataError, match=r"bad\.json:2: not valid JSON"):
        read_rows(str(tmp_path / "bad.json"))
    write_jsonl(tmp_path / "lines.json", ROWS)  # JSON Lines under a .json name
    with pytest.raises(DataError, match=r"lines\.json:2: not valid JSON \(Extra data.*rename it to \.jsonl"):
        read_rows(str(tmp_path / "lines.json"))
