import json

import pytest

from alignloop.prompts.sources import load_prompts
from alignloop.config import PromptSource
from alignloop.records import RecordError, read_prompts, read_records, write_records


def test_jsonl_error_names_file_and_line(tmp_path):
    path = tmp_path / "p.jsonl"
    path.write_text('{"prompt": "hi"}\n\n{"prompt": "oops"\n')
    with pytest.raises(RecordError, match=r"p\.jsonl:3: not valid JSON"):
        read_records(path)


def test_outputs_with_unicode_line_separators_round_trip(tmp_path):
    """JSON leaves U+2028, U+2029 and U+0085 unescaped, and str.splitlines() splits on them: a sampled output
    holding one must still read back as one record on its line (it once broke a default run's round)."""
    records = [{"prompt_id": "a", "output": "one\u2028two\u2029three\x85four\x1cfive"}, {"prompt_id": "b", "output": "x"}]
    path = tmp_path / "samples.jsonl"
    write_records(path, records)
    assert "\u2028" in path.read_text(encoding="utf-8")  # written raw, so the test tests the reader
    assert read_records(path) == records


def test_prompts_missing_field_and_bad_turns(tmp_path):
    path = tmp_path / "p.jsonl"
    path.write_text('{"prompt": "hi"}\n{"question": "no prompt"}\n')
    with pytest.raises(RecordError, match=r"p\.jsonl:2: missing field 'prompt'"):
        read_prompts(path)
    path.write_text('{"prompt": [{"role": "user"}]}\n')
    with pytest.raises(RecordError, match=r"p\.jsonl:1: field 'prompt\[0\]'"):
        read_prompts(path)


def test_plain_string_prompt_is_one_user_turn_and_extra_fields_carry(tmp_path):
    path = tmp_path / "p.jsonl"
    path.write_text('{"prompt_id": "a", "prompt": "hi", "kwargs": {"n": 3}}\n{"prompt": "yo"}\n')
    prompts = read_prompts(path)
    assert prompts[0] == {"prompt_id": "a", "prompt": [{"role": "user", "content": "hi"}], "kwargs": {"n": 3}}
    assert prompts[1]["prompt_id"] == "p000001"


def test_halos_json_array(tmp_path):
    path = tmp_path / "p.json"
    path.write_text(json.dumps([{"prompt_id": "x", "prompt": [{"role": "user", "content": "a"}]}, {"prompt": "b"}]))
    assert [p["prompt_id"] for p in read_prompts(path)] == ["x", "p000001"]
    path.write_text(json.dumps([{"prompt": "a"}, 3]))
    with pytest.raises(RecordError, match="item 1: expected a JSON object"):
        read_records(path)


def test_parquet_and_hf_dataset_sources(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    folder = tmp_path / "ds"
    folder.mkdir()
    pq.write_table(pa.table({"question": ["one?", "two?"], "qid": ["q1", "q2"]}), folder / "train.parquet")
    pq.write_table(pa.table({"prompt": ["one?", "two?"]}), tmp_path / "p.parquet")
    parquet = read_prompts(tmp_path / "p.parquet")
    assert [p["prompt"][0]["content"] for p in parquet] == ["one?", "two?"]
    # A Hugging Face dataset by name, split and column, loaded through `datasets` from a local copy.
    prompts = load_prompts(PromptSource(source="hf", path=str(folder), split="train", column="question", id_column="qid"))
    assert prompts == [
        {"qid": "q1", "prompt": [{"role": "user", "content": "one?"}], "prompt_id": "q1"},
        {"qid": "q2", "prompt": [{"role": "user", "content": "two?"}], "prompt_id": "q2"},
    ]
    with pytest.raises(RecordError, match="no column 'text'"):
        load_prompts(PromptSource(source="hf", path=str(folder), split="train", column="text"))


def test_duplicate_prompt_ids_are_refused(tmp_path):
    path = tmp_path / "p.jsonl"
    path.write_text('{"prompt_id": "a", "prompt": "x"}\n{"prompt_id": "a", "prompt": "y"}\n')
    with pytest.raises(RecordError, match="prompt_id 'a' appears more than once"):
        load_prompts(PromptSource(source="file", path=str(path)))


def test_write_is_atomic_and_refuses_nan(tmp_path):
    path = tmp_path / "out.jsonl"
    write_records(path, [{"a": 1}])
    with pytest.raises(ValueError):
        write_records(path, [{"a": 2}, {"a": float("nan")}])
    assert path.read_text() == '{"a": 1}\n'  # the old complete file, untouched
    assert [p.name for p in tmp_path.iterdir()] == ["out.jsonl"]  # no temporary left behind
