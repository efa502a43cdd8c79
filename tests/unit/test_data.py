import json

import pytest

from quantkit.calib.data import TEST_CHARS, eval_windows, load_text, sample_windows, split_text
from quantkit.errors import DatasetError


def test_sampling_is_deterministic_and_seeded():
    ids = list(range(5000))
    a = sample_windows(ids, 8, 64, seed=0)
    b = sample_windows(ids, 8, 64, seed=0)
    c = sample_windows(ids, 8, 64, seed=1)
    assert a.shape == (8, 64) and a.equal(b) and not a.equal(c)
    # windows are contiguous runs of the stream
    assert all(int(r[-1] - r[0]) == 63 for r in a)


def test_sampling_follows_the_documented_protocol():
    import random

    ids = list(range(10_000))
    rng = random.Random(7)
    starts = [rng.randrange(len(ids) - 128 + 1) for _ in range(5)]
    assert [int(r[0]) for r in sample_windows(ids, 5, 128, seed=7)] == starts


def test_split_keeps_test_text_out_of_calibration():
    text = "x" * 500_000 + "TAIL" * 50_000
    s = split_text(text)
    assert len(s.test) == TEST_CHARS and s.calib + s.test == text
    short = split_text("abcdef")
    assert short.test == "def" and short.calib == "abc"


def test_eval_windows_non_overlapping_and_capped():
    w = eval_windows(list(range(1000)), 100, max_windows=4)
    assert w.shape == (4, 100) and int(w[1, 0]) == 100
    with pytest.raises(DatasetError):
        eval_windows(list(range(10)), 100)


def test_local_formats(tmp_path):
    (tmp_path / "a.txt").write_text("hello world")
    (tmp_path / "b.jsonl").write_text(json.dumps({"text": "one"}) + "\n" + json.dumps({"text": "two"}) + "\n")
    (tmp_path / "c.json").write_text(json.dumps([{"body": "x"}, {"body": "y"}]))
    assert load_text(str(tmp_path / "a.txt")) == "hello world"
    assert load_text(str(tmp_path / "b.jsonl")) == "one\n\ntwo"
    assert load_text(str(tmp_path / "c.json"), text_field="body") == "x\n\ny"


def test_parquet(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"text": ["a", "b"]}), tmp_path / "d.parquet")
    assert load_text(str(tmp_path / "d.parquet")) == "a\n\nb"
    with pytest.raises(DatasetError, match="--text-field"):
        load_text(str(tmp_path / "d.parquet"), text_field="nope")


@pytest.mark.parametrize("content,name,needle", [
    ("{not json", "bad.jsonl", "cannot read"),
    (json.dumps({"other": 1}) + "\n", "nofield.jsonl", "--text-field"),
    ("data", "x.csv", "unsupported file type"),
    ("", "empty.txt", "holds no text"),
])
def test_bad_local_files_are_one_line(tmp_path, content, name, needle):
    (tmp_path / name).write_text(content)
    with pytest.raises(DatasetError, match=needle) as e:
        load_text(str(tmp_path / name))
    assert "\n" not in str(e.value)


def test_missing_file_and_offline_hub_id(tmp_path):
    with pytest.raises(DatasetError, match="does not exist"):
        load_text(str(tmp_path / "missing.jsonl"))
    with pytest.raises(DatasetError, match="cannot load dataset"):
        load_text("no-such-org/no-such-dataset")


def test_builtin_wiki_vital():
    text = load_text("wiki-vital")
    assert len(text) > 4_000_000 and "\n\n" in text
