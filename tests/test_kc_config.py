"""Every config value is validated: a bad one is a one-line error naming its key (exit 2 from the command line),
before anything is allocated or written; a seeded fuzz of the default config finds no other outcome."""
import copy
import dataclasses
import math
import os
import re
import subprocess
import sys
import time

import numpy as np
import pytest
import yaml

import kc_kernels
from kc import config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# a message starts with the key it is about: a top-level field, or a dotted path into a section
FIELDS = "|".join(f.name for f in dataclasses.fields(config.RunConfig))
KEY = re.compile(rf"^(config|({FIELDS})(\.[a-z0-9_]+(\[\d+\])?)*)\b")


def kc_cli(*args, timeout=60):
    t0 = time.time()
    r = subprocess.run([sys.executable, "-m", "kc", *args, "--no-progress"], cwd=ROOT, capture_output=True,
                       text=True, timeout=timeout)
    return r, time.time() - t0


@pytest.mark.parametrize("overrides, key", [
    ({"student": {"lr": math.nan}}, "student.lr"),
    ({"specialists": {"lr": math.inf}}, "specialists.lr"),
    ({"data": {"noise": -math.inf}}, "data.noise"),
    ({"taxonomy": {"coarse_fraction": math.nan}}, "taxonomy.coarse_fraction"),
    ({"student": {"scale_init_value": 10**400}}, "student.scale_init_value"),
    ({"threads": -1}, "threads"),
    ({"seed": -1}, "seed"),
    ({"seed": 2**64}, "seed"),
    ({"student": {"weight_decay": -0.1}}, "student.weight_decay"),
    ({"data": {"train_per_class": 1_000_000_000}}, "data.train_per_class"),
    ({"taxonomy": {"num_classes": 1_000_000_000}}, "taxonomy.num_classes"),
    ({"data": {"feature_dim": 10**12, "subspace_dim": 4}}, "data.feature_dim"),
    ({"student": {"s2": 2**40, "shared": 0}}, "student.s2"),
    ({"device": "cuda:1e9"}, "device"),
    ({1: 2}, "config"),
])
def test_bad_value_is_refused_naming_its_key(overrides, key):
    t0 = time.time()
    with pytest.raises(config.ConfigError) as e:
        config.load("default", overrides=overrides)
    assert time.time() - t0 < 2
    msg = str(e.value)
    assert msg.startswith(key) and "\n" not in msg, msg


def test_memory_estimate_names_the_key_and_the_sizes():
    cfg = config.load("default")
    config.check_fits(cfg, available=2**40)
    with pytest.raises(config.ConfigError, match=r"^taxonomy.num_classes: .* GiB .*taxonomy.num_classes=2000"):
        config.check_fits(cfg, available=2**20)
    for preset in ("default", "eft-100k", "wordnet-small", "tiny"):  # every preset fits a laptop
        assert sum(b for b, _ in config.memory_terms(config.load(preset))) < 4 * 2**30


@pytest.mark.parametrize("text, message", [
    ("- a\n- b\n", "top level must be a mapping"),
    ("just words\n", "top level must be a mapping"),
    ("student: {lr: [\n", "not valid YAML"),
    ("a: b: c\n", "not valid YAML"),
    ("x: " + "[" * 5000 + "]" * 5000 + "\n", "config file"),
    ("name: !!python/name:os.system\n", "not valid YAML"),
])
def test_config_file_that_is_not_a_yaml_mapping(tmp_path, text, message):
    p = tmp_path / "c.yaml"
    p.write_text(text)
    with pytest.raises(config.ConfigError, match=message) as e:
        config.load("tiny", str(p))
    assert str(p) in str(e.value) and "\n" not in str(e.value)


def test_config_file_that_is_not_text_or_not_a_file(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_bytes(b"\xff\xfe\x00bad")
    with pytest.raises(config.ConfigError, match="not UTF-8"):
        config.load("tiny", str(p))
    with pytest.raises(config.ConfigError, match="is a folder"):
        config.load("tiny", str(tmp_path))


# ---------------------------------------------------------------------------------------------- fuzz

POOL = [math.nan, math.inf, -math.inf, -1, 0, 1, 2, 3.5, -0.5, 0.999, 1e-300, 1e308, 10**9, -10**9, 2**40, 2**63,
        2**64 + 1, 10**400, "", "x", "auto", "cuda", "cuda:0", "cpu", "triton", "fc_sc", "vertical", "sqrt",
        "synthetic", "images", "wordnet", "../../etc/passwd", "nan", None, True, False, [], {}, [1, 2], [-1],
        [0.5], ["fc_fc", "bogus"], {"a": 1}, "a" * 10000]


def _leaves(d, prefix=()):
    for k, v in d.items():
        if isinstance(v, dict):
            yield from _leaves(v, prefix + (k,))
        yield prefix + (k,), v


def mutate(base, rng):
    """The default config with one to three random edits: a value from POOL (or a list element, or a number
    scaled by a power of ten), a key removed or unknown, a section replaced by a scalar."""
    d = copy.deepcopy(base)
    paths = [p for p, _ in _leaves(base)]
    for _ in range(int(rng.integers(1, 4))):
        path = paths[int(rng.integers(len(paths)))]
        parent = d
        for k in path[:-1]:
            parent = parent.get(k) if isinstance(parent, dict) else None
        if not isinstance(parent, dict):
            continue
        key, kind = path[-1], int(rng.integers(6))
        old = parent.get(key)
        if kind == 0:
            parent.pop(key, None)
        elif kind == 1:
            parent[key + "_typo"] = 1
        elif kind == 2 and isinstance(old, list) and old:
            old[int(rng.integers(len(old)))] = POOL[int(rng.integers(len(POOL)))]
        elif kind == 3 and isinstance(old, (int, float)) and not isinstance(old, bool):
            v = old * 10.0 ** int(rng.integers(-12, 13)) * float(rng.choice([1, -1]))
            parent[key] = int(v) if isinstance(old, int) and abs(v) < 1e300 else v
        else:
            parent[key] = POOL[int(rng.integers(len(POOL)))]
    return d


def test_fuzzed_default_config_validates_or_names_a_key(tmp_path):
    rng = np.random.default_rng(20261208)
    base = config.load("default").to_dict()
    outcomes = {"valid": 0, "refused": 0}
    t0 = time.time()
    for i in range(1200):
        d = mutate(base, rng)
        try:
            if i % 10 == 0:  # through a YAML file, as the command line reads it
                p = tmp_path / "c.yaml"
                p.write_text(yaml.safe_dump(d))
                cfg = config.load("default", str(p))
            else:
                cfg = config.from_dict(d)
        except config.ConfigError as e:
            msg = str(e)
            assert "\n" not in msg and (KEY.match(msg) or msg.startswith("config file")), (d, msg)
            outcomes["refused"] += 1
            continue
        # a config that validates prints back and reads back as itself, and fits this machine
        assert config.from_dict(yaml.safe_load(cfg.to_yaml())) == cfg
        assert all(isinstance(v, float) and math.isfinite(v) for _, v in _leaves(cfg.to_dict())
                   if isinstance(v, float))
        outcomes["valid"] += 1
    assert time.time() - t0 < 30, time.time() - t0
    assert outcomes["valid"] > 100 and outcomes["refused"] > 500, outcomes


BAD_RUNS = [
    ("student: {lr: .nan}\n", [], "student.lr"),
    ("data: {train_per_class: 1000000000}\n", [], "data.train_per_class"),
    ("taxonomy: {num_classes: 1000000000}\n", [], "taxonomy.num_classes"),
    ("- not a mapping\n", [], "config file"),
    ("{{{\n", [], "config file"),
    ("", ["--threads", "-2"], "threads"),
    ("", ["--seed", "-5"], "seed"),
    ("", ["--seeds", "0,-1"], "--seeds"),
]


@pytest.mark.parametrize("yaml_text, args, key", BAD_RUNS)
def test_command_line_refuses_in_one_line(tmp_path, capsys, yaml_text, args, key):
    from kc import cli

    p = tmp_path / "c.yaml"
    p.write_text(yaml_text)
    out = tmp_path / "o"
    t0 = time.time()
    assert cli.main(["run", "--preset", "tiny", "--config", str(p), "--out", str(out), "--no-progress", *args]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"kc: error: {key}") and err.count("\n") == 1 and "Traceback" not in err, err
    assert time.time() - t0 < 5 and not out.exists()


@pytest.mark.parametrize("yaml_text, args, key", [BAD_RUNS[2]])
def test_command_line_process_refuses_within_seconds(tmp_path, yaml_text, args, key):
    p = tmp_path / "c.yaml"
    p.write_text(yaml_text)
    out = tmp_path / "o"
    r, seconds = kc_cli("run", "--preset", "tiny", "--config", str(p), "--out", str(out), *args)
    assert r.returncode == 2 and r.stderr.startswith(f"kc: error: {key}"), r.stderr
    assert r.stderr.count("\n") == 1 and "Traceback" not in r.stderr
    assert seconds < 30 and not out.exists()


def test_backend_that_cannot_run_here_is_refused(tmp_path):
    found = kc_kernels.backends()
    missing = [b for b in ("cuda", "triton") if found[b] is not True]
    if not missing:
        pytest.skip("every backend can run here")
    p = tmp_path / "c.yaml"
    p.write_text(f"backend: {missing[0]}\n")
    r, _ = kc_cli("run", "--preset", "tiny", "--config", str(p), "--out", str(tmp_path / "o"),
                  timeout=120)
    assert r.returncode == 2 and r.stderr.startswith(f"kc: error: backend: '{missing[0]}' cannot run here")
    assert r.stderr.count("\n") == 1 and not (tmp_path / "o").exists()
