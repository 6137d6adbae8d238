"""kc.wordnet: the data.noun reader, vertical selection from the noun hierarchy, the `taxonomy.source: wordnet` hook.

tests/data/wordnet-excerpt.noun holds WordNet 3.0's license header and 186 synset lines, unchanged: the subtrees of
car (02958343), shark (01482330), chelonian (01662622), piciform_bird (01838038) and planet (09394007, with its
instances), plus every hypernym chain of those synsets up to entity, made with
`kc.wordnet.excerpt_lines("/usr/share/wordnet/data.noun", [2958343, 1482330, 1662622, 1838038, 9394007],
instances=True)`. Its license is tests/data/WORDNET-LICENSE.
"""
import itertools
import os
import random

import numpy as np
import pytest
import yaml

from kc import cli, config, label_space, taxonomy, wordnet
from kc.taxonomy import TaxonomyError
from kc.wordnet import WordNetError

EXCERPT = os.path.join(os.path.dirname(__file__), "data", "wordnet-excerpt.noun")
CAR, SHARK, CHELONIAN, PICIFORM, PLANET = 2958343, 1482330, 1662622, 1838038, 9394007
CAB, MINICAB, MINIVAN, PASSENGER_VAN, BUS = 2930766, 3769967, 3770679, 3896419, 2924554


def line(offset, words, hypernyms=(), instance_of=(), others=()):
    """A data.noun line in the wndb(5) format (for hand-made test files)."""
    ptrs = [("@", h, "n") for h in hypernyms] + [("@i", h, "n") for h in instance_of] + list(others)
    return (f"{offset:08d} 03 n {len(words):02x} " + " ".join(f"{w} 0" for w in words) + f" {len(ptrs):03d}"
            + "".join(f" {s} {t:08d} {pos} 0000" for s, t, pos in ptrs) + " | a gloss  ")


@pytest.fixture(scope="module")
def synsets():
    return wordnet.read(EXCERPT)


@pytest.fixture(scope="module")
def hier(synsets):
    return wordnet.Hierarchy(synsets)


# ---------------------------------------------------------------------------------------------- parsing

def test_parse_line_fields():
    with open(EXCERPT) as f:
        car_line = next(x for x in f if x.startswith("02958343 "))
    s = wordnet.parse_line(car_line)
    assert s.offset == CAR and s.lex_filenum == 6 and s.wnid == "n02958343"
    assert s.words == ("car", "auto", "automobile", "machine", "motorcar") and s.lemma == "car"
    assert s.hypernyms == (3791235,) and s.instance_hypernyms == ()  # 76 pointers, one of them '@'


def test_parse_line_instance_and_other_pointers():
    s = wordnet.parse_line(line(5, ["Jupiter"], instance_of=(3, 4),
                                others=[("#m", 9, "n"), ("+", 7, "a"), ("@", 8, "v"), ("~i", 10, "n")]))
    assert s.instance_hypernyms == (3, 4) and s.hypernyms == ()  # '@' to a verb is no noun hypernym
    assert wordnet.parse_line(line(6, ["a_b", "c"], hypernyms=(1, 2))).hypernyms == (1, 2)
    assert wordnet.parse_line("00000011 03 n 0b " + " ".join(f"w{i} 0" for i in range(11)) + " 000 | g").words[-1] \
        == "w10"  # w_cnt is hexadecimal


@pytest.mark.parametrize("text, message", [
    ("00000001 03 n 01 cat 0 000 no gloss", r"no '\|'"),
    ("0000001 03 n 01 cat 0 000 | g", "synset_offset must have 8 digits"),
    ("0000000x 03 n 01 cat 0 000 | g", "synset_offset is not a decimal"),
    ("00000001 3 n 01 cat 0 000 | g", "lex_filenum must have 2 digits"),
    ("00000001 03 v 01 cat 0 000 | g", "not a noun"),
    ("00000001 03 n 00 000 | g", "too few fields"),
    ("00000001 03 n 00 x 0 000 | g", "at least one word"),
    ("00000001 03 n 03 cat 0 000 | g", "line ends early"),
    ("00000001 03 n 01 cat z 000 | g", "lex_id of word 1"),
    ("00000001 03 n 01 cat 0 002 @ 00000002 n 0000 | g", "p_cnt says 2 pointers"),
    ("00000001 03 n 01 cat 0 001 @ 00000002 n 0000 x | g", "p_cnt says 1 pointers"),
    ("00000001 03 n 01 cat 0 001 @ 0000002 n 0000 | g", "synset_offset of pointer 1"),
    ("00000001 03 n 01 cat 0 001 @ 00000002 q 0000 | g", "unknown pos"),
    ("00000001 03 n 01 cat 0 001 @ 00000002 n 00g0 | g", "source/target of pointer 1"),
])
def test_parse_line_errors(text, message):
    with pytest.raises(WordNetError, match=message):
        wordnet.parse_line(text, "f:3")
    assert issubclass(WordNetError, ValueError) and issubclass(WordNetError, TaxonomyError)


def test_read_excerpt(synsets):
    with open(EXCERPT) as f:
        lines = f.read().splitlines()
    header = [x for x in lines if x.startswith("  ")]
    assert len(header) == 29 and "Princeton" in "".join(header)  # the license header is skipped, not parsed
    assert len(synsets) == len(lines) - len(header) == 186
    assert synsets[1740].lemma == "entity" and synsets[1740].hypernyms == ()
    for s in synsets.values():  # a connected slice: every chain reaches entity
        o, steps = s.offset, 0
        while synsets[o].hypernyms or synsets[o].instance_hypernyms:
            o = (synsets[o].hypernyms or synsets[o].instance_hypernyms)[0]
            steps += 1
        assert o == 1740 and steps < 25


def test_read_errors(tmp_path):
    missing = str(tmp_path / "nope" / "data.noun")
    with pytest.raises(WordNetError) as e:
        wordnet.read(missing)
    assert "taxonomy.wordnet_path" in str(e.value) and "wordnet-base" in str(e.value) and missing in str(e.value)
    p = tmp_path / "dangling.noun"
    p.write_text("  1 license\n" + line(1, ["top"]) + "\n" + line(2, ["kid"], hypernyms=(7,)) + "\n")
    with pytest.raises(WordNetError, match=r"dangling.noun:3: synset 00000002 \(kid\) names hypernym 00000007"):
        wordnet.read(str(p))
    p.write_text(line(1, ["top"]) + "\n" + line(1, ["again"]) + "\n")
    with pytest.raises(WordNetError, match="already appeared on line 1"):
        wordnet.read(str(p))
    p.write_text("  1 only a header\n\n")
    with pytest.raises(WordNetError, match="holds no synsets"):
        wordnet.read(str(p))
    p.write_bytes(b"\xff\xfe\x00garbage")
    with pytest.raises(WordNetError, match="not a text file"):
        wordnet.read(str(p))


# ---------------------------------------------------------------------------------------------- hierarchy

def test_hierarchy_instances_and_lookup(synsets, hier):
    n_inst = sum(1 for s in synsets.values() if s.instance_hypernyms and not s.hypernyms)
    assert n_inst == 10 and len(hier) == 186 - n_inst
    with_inst = wordnet.Hierarchy(synsets, instances=True)
    assert len(with_inst) == 186
    assert len(hier.descendants(PLANET)) == 6 and len(with_inst.descendants(PLANET)) == 16
    assert hier.find("car") == hier.find("n02958343") == hier.find("02958343") == hier.find("Car") == CAR
    assert hier.find("piciform bird") == PICIFORM
    with pytest.raises(WordNetError, match="taxonomy.wordnet_under: no noun synset has 'dragon'"):
        hier.find("dragon")
    with pytest.raises(WordNetError, match="my.option: no noun synset 00000009"):
        hier.find("n00000009", option="my.option")


def test_hierarchy_cycle_is_an_error():
    syn = {s.offset: s for s in map(wordnet.parse_line, [line(1, ["a"], hypernyms=(2,)), line(2, ["b"], (3,)),
                                                         line(3, ["c"], (1,)), line(4, ["d"])])}
    with pytest.raises(WordNetError, match="cycle"):
        wordnet.Hierarchy(syn)


def test_subtree_sizes_count_every_path_once(hier):
    sizes = hier.subtree_sizes(100)
    assert sizes[CAR] == 40 and sizes[SHARK] == 39 and sizes[CHELONIAN] == 31 and sizes[PICIFORM] == 20
    for o, n in sizes.items():
        assert n == len(hier.descendants(o)) <= 100
    assert 1740 not in sizes and len(hier.descendants(1740)) == len(hier) - 1  # entity is above the limit
    assert MINICAB in hier.descendants(CAR) and hier.descendants(CAR).count(MINICAB) == 1  # two paths, once


def test_excerpt_lines_is_a_hypernym_closed_slice(hier, tmp_path):
    lines = wordnet.excerpt_lines(EXCERPT, [PICIFORM])
    assert sum(1 for x in lines if x.startswith("  ")) == 29  # the license header comes along
    p = tmp_path / "piciform.noun"
    p.write_text("\n".join(lines) + "\n")
    h = wordnet.Hierarchy(wordnet.read(str(p)))  # every hypernym named is there
    chain = {1740, 1930, 2684, 3553, 4258, 4475, 15388, 1466257, 1471682, 1503061}  # entity ... bird
    assert set(h.synsets) == {PICIFORM} | set(hier.descendants(PICIFORM)) | chain
    assert len(wordnet.excerpt_lines(EXCERPT, [PICIFORM], max_per_root=3)) == 29 + 1 + 3 + len(chain)


# ---------------------------------------------------------------------------------------------- selection

def _check_selection(hier, roots, n, lo, hi, cap):
    assert len(roots) == n
    below = [set(hier.descendants(r)) for r in roots]
    sizes = [len(b) for b in below]
    assert all(lo <= s <= hi for s in sizes) and sum(sizes) <= cap
    for (a, ba), (b, bb) in itertools.combinations(zip(roots, below), 2):
        assert not (ba | {a}) & (bb | {b}), (a, b)  # disjoint along every path, roots included
    return sizes


@pytest.mark.parametrize("n, lo, hi, cap", [(1, 5, 200, 1000), (2, 10, 45, 200), (3, 15, 45, 200),
                                            (4, 10, 45, 200), (4, 5, 45, 130), (5, 3, 40, 100), (6, 2, 30, 80)])
def test_select_verticals_disjoint_in_range_deterministic(synsets, hier, n, lo, hi, cap):
    under = hier.find("physical_entity")
    roots = wordnet.select_verticals(hier, n, lo, hi, cap, under=under)
    sizes = _check_selection(hier, roots, n, lo, hi, cap)
    assert all(r == under or r in hier.descendants(under) for r in roots)
    if n == 1:
        assert roots == [under]  # physical_entity's 167 classes: the nearest to the 200 asked for
    if n >= 3:
        assert len(set(sizes)) > 1  # sizes spread over the range
    # the same whatever order the file's lines came in
    items = list(synsets.items())
    random.Random(n).shuffle(items)
    assert wordnet.select_verticals(wordnet.Hierarchy(dict(items)), n, lo, hi, cap, under=under) == roots


def test_select_verticals_known_result(hier):
    roots = wordnet.select_verticals(hier, 3, 15, 45, 200, under=hier.find("physical_entity"))
    tax = wordnet.build_taxonomy(hier, roots)
    # targets 45, 26, 15: self-propelled_vehicle (45, holds car), turtle (30), piciform_bird (20; woodpecker's 13 is
    # below the range)
    assert wordnet.describe(tax) == [("turtle", 30), ("piciform_bird", 20), ("self-propelled_vehicle", 45)]
    # a smaller cap lowers the top target: 3 verticals of 5..45 classes within 50 classes
    assert [round(t, 1) for t in wordnet.size_targets(3, 5, 45, 50)] == [32.3, 12.7, 5.0]
    roots = wordnet.select_verticals(hier, 3, 5, 45, 50)
    assert sorted(_check_selection(hier, roots, 3, 5, 45, 50)) == [5, 13, 32]


def test_select_verticals_errors(hier):
    with pytest.raises(WordNetError, match=r"taxonomy.num_verticals: only \d+ disjoint subtrees of 30..45"):
        wordnet.select_verticals(hier, 5, 30, 45, 1000)
    with pytest.raises(WordNetError, match="taxonomy.num_classes: 4 verticals of at least 30"):
        wordnet.select_verticals(hier, 4, 30, 45, 100)
    for kwargs, name in (({"num_verticals": 0}, "num_verticals"), ({"min_size": -1}, "min_size"),
                         ({"max_size": 2.5}, "max_size"), ({"max_classes": True}, "max_classes")):
        args = dict(dict(num_verticals=2, min_size=5, max_size=40, max_classes=100), **kwargs)
        with pytest.raises(ValueError, match=name):
            wordnet.select_verticals(hier, **args)
    with pytest.raises(ValueError, match="min_size"):
        wordnet.select_verticals(hier, 2, 50, 40, 100)
    with pytest.raises(ValueError, match="under: 12345"):
        wordnet.select_verticals(hier, 2, 5, 40, 100, under=12345)


# ---------------------------------------------------------------------------------------------- taxonomy

def test_build_taxonomy_parents_and_multiple_inheritance(hier):
    tax = wordnet.build_taxonomy(hier, [SHARK, CAR])
    assert tax.vertical_names == ["shark", "car"]  # root offset order
    assert tax.vertical_sizes().tolist() == [39, 40]
    index = {n: i for i, n in enumerate(tax.names)}
    name = {o: wordnet.class_name(hier.synsets[o]) for o in hier.synsets}
    assert name[MINIVAN] == "minivan.n03770679"
    # minivan: hypernyms passenger_van (outside the vertical) and car (the root): a top class of the vertical
    assert tax.parent[index[name[MINIVAN]]] == -1 and tax.parent[index[name[BUS]]] == -1
    # minicab: hypernyms cab and minicar, both one step below car: the first listed, cab
    assert hier.parents[MINICAB] == (CAB, 3770085)
    assert tax.parent[index[name[MINICAB]]] == index[name[CAB]]
    for c in range(tax.num_classes):  # every parent is a hypernym in the same vertical
        o = int(tax.names[c].rsplit(".n", 1)[1])
        if tax.parent[c] >= 0:
            assert int(tax.names[tax.parent[c]].rsplit(".n", 1)[1]) in hier.parents[o]
        else:
            assert {SHARK, CAR} & set(hier.parents[o])
    assert tax.depth() == 3 and tax.labels_of(index[name[MINICAB]]) == [index[name[MINICAB]], index[name[CAB]]]


def test_build_taxonomy_overlap_and_names(hier, tmp_path):
    with pytest.raises(WordNetError, match="lies below two vertical roots"):
        wordnet.build_taxonomy(hier, [CAR, PASSENGER_VAN])  # minivan is below both
    syn = {s.offset: s for s in map(wordnet.parse_line, [
        line(1, ["top"]), line(2, ["plant"], (1,)), line(3, ["plant"], (1,)), line(4, ["oak"], (2,)),
        line(5, ["rose"], (2,)), line(6, ["factory"], (3,)), line(7, ["mill"], (3,))])}
    tax = wordnet.build_taxonomy(wordnet.Hierarchy(syn), [3, 2])
    assert tax.vertical_names == ["plant", "plant.n00000003"]  # the same first word: the later root's wnid
    p = str(tmp_path / "t.csv")
    tax.save(p)
    back = taxonomy.load(p)  # what the pipeline does with it
    assert back.names == tax.names and np.array_equal(back.segments, tax.segments)
    assert np.array_equal(back.parent, tax.parent)


# ---------------------------------------------------------------------------------------------- the config hook

def _wordnet_cfg(path=EXCERPT, **taxonomy_keys):
    tax = dict(source="wordnet", wordnet_path=path, num_verticals=3, num_classes=200, vertical_min_classes=15,
               vertical_max_classes=45)
    tax.update(taxonomy_keys)
    return {"taxonomy": tax}


def test_from_config_wordnet_and_generate():
    cfg = config.load("tiny", overrides=_wordnet_cfg())
    tax = label_space.from_config(cfg.taxonomy, cfg.seed)
    assert sorted(tax.vertical_names) == ["piciform_bird", "self-propelled_vehicle", "turtle"]
    assert label_space.from_config(cfg.taxonomy, 7).names == tax.names  # WordNet's selection ignores the seed
    cfg = config.load("tiny", overrides=_wordnet_cfg(wordnet_under="n01466257"))  # chordate: no vehicles
    assert "self-propelled_vehicle" not in label_space.from_config(cfg.taxonomy, 0).vertical_names
    cfg = config.load("tiny", overrides=_wordnet_cfg(num_verticals=1, num_classes=30, vertical_min_classes=12,
                                                     vertical_max_classes=16, wordnet_under="planet",
                                                     wordnet_instances=True))
    assert label_space.from_config(cfg.taxonomy, 0).vertical_names == ["planet"]  # 16 synsets with its instances
    gen = config.load("tiny")
    assert label_space.from_config(gen.taxonomy, 3).names == taxonomy.generate(3, 30, coarse_fraction=0.15,
                                                                            size_spread=0.85, seed=3).names


@pytest.mark.parametrize("keys, message", [
    ({"source": "imagenet"}, "taxonomy.source: must be one of"),
    ({"file": "t.csv"}, "taxonomy.file: a taxonomy file and taxonomy.source: wordnet"),
    ({"vertical_min_classes": 0}, "taxonomy.vertical_min_classes"),
    ({"vertical_max_classes": 10}, "taxonomy.vertical_max_classes"),
    ({"num_classes": 40}, "taxonomy.num_classes"),
    ({"wordnet_path": ""}, "taxonomy.wordnet_path"),
    ({"wordnet_under": " "}, "taxonomy.wordnet_under"),
    ({"wordnet_instances": "yes"}, "taxonomy.wordnet_instances"),
])
def test_config_errors(keys, message):
    with pytest.raises(config.ConfigError, match=message):
        config.load("tiny", overrides=_wordnet_cfg(**keys))


def test_wordnet_small_preset_config():
    cfg = config.load("wordnet-small")
    t = cfg.taxonomy
    assert t.source == "wordnet" and t.wordnet_path == wordnet.DEFAULT_PATH and t.file is None
    assert t.num_verticals * t.vertical_min_classes <= t.num_classes


def test_missing_file_is_a_clear_error(tmp_path, capsys):
    missing = str(tmp_path / "data.noun")
    cfg = config.load("tiny", overrides=_wordnet_cfg(path=missing))
    with pytest.raises(WordNetError, match="taxonomy.wordnet_path.*wordnet-base"):
        label_space.from_config(cfg.taxonomy, 0)
    cfg_path = tmp_path / "c.yaml"
    cfg_path.write_text(yaml.safe_dump(_wordnet_cfg(path=missing)))
    assert cli.main(["data", "--preset", "tiny", "--config", str(cfg_path), "--out", str(tmp_path / "o"),
                     "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "taxonomy.wordnet_path" in err and missing in err and "apt-get install wordnet-base" in err


def test_run_end_to_end_on_the_excerpt(tmp_path, capsys):
    import json

    cfg_path = tmp_path / "c.yaml"
    cfg_path.write_text(yaml.safe_dump(_wordnet_cfg()))
    out = str(tmp_path / "o")
    assert cli.main(["run", "--preset", "tiny", "--config", str(cfg_path), "--out", out, "--no-progress"]) == 0
    assert "95 classes in 3 verticals (sizes 20-45)" in capsys.readouterr().out
    tax = taxonomy.load(os.path.join(out, "taxonomy.csv"))
    assert tax.vertical_names == ["turtle", "piciform_bird", "self-propelled_vehicle"] and tax.depth() == 4
    res = json.load(open(os.path.join(out, "report", "results.json")))
    for m in res["models"].values():
        assert len(m["map_per_vertical"]) == 3 and 0 <= m["map"] <= 1


# ---------------------------------------------------------------------------------------------- the full file

@pytest.mark.skipif(not os.path.exists(wordnet.DEFAULT_PATH), reason="WordNet 3.0 (Debian: wordnet-base) is absent")
def test_full_wordnet_default_selection():
    syn = wordnet.read()
    assert len(syn) == 82115  # WordNet 3.0's noun synsets
    t = config.load("wordnet-small").taxonomy  # its selection, as taxonomy.from_config makes it (one read only)
    h = wordnet.Hierarchy(syn, instances=t.wordnet_instances)
    assert len(h) == 74390  # without the instances
    tax = wordnet.build_taxonomy(h, wordnet.select_verticals(h, t.num_verticals, t.vertical_min_classes,
                                                             t.vertical_max_classes, t.num_classes,
                                                             under=h.find(t.wordnet_under)))
    sizes = tax.vertical_sizes()
    assert tax.num_verticals == t.num_verticals and tax.num_classes <= t.num_classes
    assert sizes.min() >= t.vertical_min_classes and sizes.max() <= t.vertical_max_classes
    assert wordnet.describe(tax) == [("protozoan", 49), ("shark", 39), ("chelonian", 31), ("lizard", 62),
                                     ("piciform_bird", 20), ("adornment", 77), ("car", 25), ("enclosure", 97)]
