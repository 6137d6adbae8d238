import json
import os

import numpy as np
import pytest

from kc import taxonomy
from kc.taxonomy import TaxonomyError


def test_generate_contiguous_segments_and_hierarchy():
    t = taxonomy.generate(4, 60, coarse_fraction=0.2, seed=3)
    assert t.num_classes == 60 and t.num_verticals == 4
    assert t.segments[0] == 0 and t.segments[-1] == 60 and np.all(np.diff(t.segments) >= 2)
    for c in range(t.num_classes):
        for a in t.ancestors(c):
            assert t.vertical_of[a] == t.vertical_of[c]
    leaf = int(t.leaves()[0])
    assert t.labels_of(leaf)[0] == leaf and len(t.labels_of(leaf)) == t.depth()
    again = taxonomy.generate(4, 60, coarse_fraction=0.2, seed=3)
    assert again.names == t.names and np.array_equal(again.parent, t.parent)


@pytest.mark.parametrize("ext", ["csv", "json"])
def test_save_load_round_trip(tmp_path, ext):
    t = taxonomy.generate(3, 31, seed=1)
    p = str(tmp_path / f"tax.{ext}")
    t.save(p)
    u = taxonomy.load(p)
    assert u.names == t.names and np.array_equal(u.parent, t.parent) and np.array_equal(u.segments, t.segments)


def test_rows_are_regrouped_by_vertical():
    rows = [{"class": "cat", "vertical": "animals", "parent": ""},
            {"class": "car", "vertical": "vehicles", "parent": ""},
            {"class": "tabby", "vertical": "animals", "parent": "cat"},
            {"class": "sedan", "vertical": "vehicles", "parent": "car"}]
    t = taxonomy.from_rows(rows)
    assert t.names == ["cat", "tabby", "car", "sedan"]
    assert t.segments.tolist() == [0, 2, 4]
    assert t.labels_of(1) == [1, 0] and t.labels_of(3) == [3, 2]


@pytest.mark.parametrize("rows, message", [
    ([{"class": "a", "vertical": "v", "parent": "zzz"}], "unknown parent"),
    ([{"class": "a", "vertical": "v", "parent": "b"}, {"class": "b", "vertical": "v", "parent": "a"}], "cycle"),
    ([{"class": "a", "vertical": "v", "parent": ""}, {"class": "b", "vertical": "w", "parent": "a"}],
     "another vertical"),
    ([{"class": "a", "vertical": "v", "parent": ""}, {"class": "a", "vertical": "v", "parent": ""}], "twice"),
    ([{"class": "a", "parent": ""}], "lacks"),
    ([], "no classes"),
])
def test_bad_rows(rows, message):
    with pytest.raises(TaxonomyError, match=message):
        taxonomy.from_rows(rows)


def test_bad_files(tmp_path):
    with pytest.raises(TaxonomyError, match="does not exist"):
        taxonomy.load(str(tmp_path / "missing.csv"))
    p = tmp_path / "bad.json"
    p.write_text("{not json")
    with pytest.raises(TaxonomyError, match="not valid JSON"):
        taxonomy.load(str(p))
    p.write_text(json.dumps({"class": "a"}))
    with pytest.raises(TaxonomyError, match="JSON list"):
        taxonomy.load(str(p))
    c = tmp_path / "bad.csv"
    c.write_text("name,group\na,b\n")
    with pytest.raises(TaxonomyError, match="header"):
        taxonomy.load(str(c))


def test_a_taxonomy_file_that_is_not_a_regular_file_is_refused(tmp_path):
    os.symlink("/dev/zero", tmp_path / "tax.json")
    with pytest.raises(TaxonomyError, match="not a regular file"):
        taxonomy.load(str(tmp_path / "tax.json"))
