"""Run configuration: dataclasses that read from YAML (unknown keys and bad values are errors) and print back.

A run's whole behaviour is this config plus its seed; it is saved in the output directory so that a resumed run
can check that it continues the same experiment.
"""
from __future__ import annotations

import copy
import dataclasses
import math
import os
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Union, get_args, get_origin, get_type_hints

import yaml


class ConfigError(ValueError):
    """A config that cannot describe a run; the message names the key."""


HEADS = ("fc_fc", "fc_sc", "sc_sc", "fc_sc_shared", "fc_fc_matched")
# bayes_*: distilled from the generator's Bayes-optimal posterior instead of the specialists (synthetic data only):
# the gain a perfect teacher would bring, the ceiling of what distillation can add on this data
METHODS = ("generalist", "distilled", "self_paced", "bayes_distilled", "bayes_self_paced",
           # controls that separate the effects: hard labels with the learned scale and no teacher; distilled with
           # the normalised head at gamma's start, not learned; distilled with a learned gamma per class
           "scaled", "fixed_scale", "self_paced_class")
SCALE_INITS = ("sqrt", "sqrt_log", "fixed")
BIAS_INITS = ("prior", "uniform")
SCALES = ("none", "vertical", "class")
# keys that change how fast a run goes or how often it saves, never its results: a run may resume with others
RUNTIME_KEYS = ("threads", "checkpoint_seconds", "dist_timeout")
DATA_KINDS = ("synthetic", "features", "images")
TAXONOMY_SOURCES = ("generate", "wordnet")
BACKBONES = ("mlp", "cnn")


@dataclass
class TaxonomyConfig:
    file: Optional[str] = None  # CSV or JSON (class, vertical, parent); None = from `source`
    # where the label space comes from when no file is given: "generate" (a random two-level taxonomy) or
    # "wordnet" (disjoint subtrees of WordNet 3.0's noun hierarchy, kc/wordnet.py): num_verticals subtrees of
    # vertical_min_classes..vertical_max_classes classes each, num_classes at most in all
    source: str = "generate"
    wordnet_path: str = "/usr/share/wordnet/data.noun"  # Debian package wordnet-base
    wordnet_under: str = "physical_entity"  # verticals only within this synset's subtree (first word, or wnid)
    wordnet_instances: bool = False  # instance synsets (proper nouns: "Einstein", "Paris") as classes too
    vertical_min_classes: int = 20
    vertical_max_classes: int = 2000
    num_verticals: int = 8
    num_classes: int = 400
    coarse_fraction: float = 0.15  # share of a vertical's classes that are internal (parent) nodes
    size_spread: float = 0.85  # vertical sizes vary by up to this fraction around the mean


@dataclass
class DataConfig:
    kind: str = "synthetic"
    path: Optional[str] = None  # features: dir with train/ and test/ shards; images: root with train/ and test/
    feature_dim: int = 64
    train_per_class: int = 24  # samples per leaf class (synthetic)
    test_per_class: int = 6
    subspace_dim: int = 12  # dimensions that carry a vertical's fine-grained structure
    vertical_separation: float = 3.0
    coarse_spread: float = 1.6
    sibling_spread: float = 0.6  # small relative to noise: siblings are confusable
    noise: float = 1.1
    noise_spread: float = 0.8  # verticals differ in difficulty by up to this fraction of the noise
    isotropic_noise: float = 0.3
    modes: int = 1  # poses per coarse class (multi-modal classes need non-linear capacity)
    mode_spread: float = 0.0
    label_noise: float = 0.0  # share of training samples labelled as a random sibling
    # validation rows per leaf class (synthetic), drawn apart from train and test: early stopping reads them;
    # 0: no validation split (every model trains its maximum epochs). Scoring them after an epoch takes a default
    # student about 0.2 s of CPU at 2 (0.5 s at 4) against 4-6 s for the epoch; a study that chooses settings on
    # them wants more
    val_per_class: int = 2
    # real data without a val/ folder: this share of train/, drawn by the run's seed, is held out for validation
    val_fraction: float = 0.1
    # share of rows (every split) that also show objects of other verticals, as OpenImages' rows do (synthetic);
    # such a row carries 2 to max_verticals verticals' labels, each object's features added to the row's
    multi_vertical: float = 0.0
    max_verticals: int = 3
    shard_size: int = 65536
    image_size: int = 32


@dataclass
class SpecialistConfig:
    hidden: List[int] = field(default_factory=lambda: [256, 128])
    epochs: int = 30
    batch_size: int = 128
    lr: float = 2e-3
    weight_decay: float = 1e-4
    background_fraction: float = 0.5  # other verticals' samples, as all-negative rows, per own sample


@dataclass
class CacheConfig:
    top_k: int = 100
    batch_size: int = 1024


@dataclass
class StudentConfig:
    backbone: str = "mlp"
    backbone_hidden: List[int] = field(default_factory=lambda: [256])
    sb: int = 128  # backbone output width
    heads: List[str] = field(default_factory=lambda: ["fc_fc", "fc_sc"])
    methods: List[str] = field(default_factory=lambda: ["generalist", "distilled", "self_paced"])
    s1: int = 128  # FC-FC first layer
    s2: int = 32  # units feeding the output layer (per vertical in SC heads)
    s1s: int = 128  # shared FC in FC-SC heads
    s1i: int = 16  # per-vertical first layer in SC-SC
    s2_fc: int = 32  # FC-FC's second layer
    shared: int = 4  # FC-SC shared head: units of each block shared across verticals
    scale: str = "vertical"  # the self-paced scale of the "self_paced" method
    # gamma's start: sqrt(N_v) (the paper's), sqrt(N_v) * ln(N_v / scale_init_k) (grows with the share of a
    # vertical's classes that are negatives of a row), or scale_init_value for every vertical
    scale_init: str = "sqrt"
    scale_init_k: float = 1.0
    scale_init_value: float = 10.0
    bias_init: str = "prior"  # output bias at the logit of each class's training frequency, or -ln(N) everywhere
    # training stops (an error) when the model has collapsed: this share of the backbone's last units never fire
    # on a probe batch, or the logits barely vary across inputs (spread below collapse_spread, see train.health)
    collapse_dead: float = 0.95
    collapse_spread: float = 0.02
    hard_weight: float = 0.3  # targets = (1 - w) * teacher + w * hard labels
    epochs: int = 24
    batch_size: int = 128
    lr: float = 2e-3
    scale_lr: float = 5e-2  # on log(gamma)
    weight_decay: float = 0.0


@dataclass
class EvalConfig:
    row_chunk: int = 4096
    class_chunk: int = 1024
    timing_batch: int = 256
    bayes: bool = True  # synthetic data: also score the generator's Bayes posterior (the best possible mAP)


@dataclass
class StoppingConfig:
    """Early stopping of every model (specialists and students) on validation mAP; `epochs` of each section is
    its maximum budget."""

    patience: int = 2  # epochs without a gain of more than min_delta before a model stops; 0: never stop early
    min_delta: float = 0.0  # validation mAP (a fraction, 0.001 = 0.1 point)


@dataclass
class RunConfig:
    name: str = "default"
    seed: int = 0
    device: str = "cpu"
    backend: str = "auto"  # kc_kernels backend of the loss
    threads: int = 0  # torch threads; 0: one per idle core this process may run on (pipeline.auto_threads)
    # seconds between a student's checkpoints inside an epoch (0: after every step); every epoch's end is saved too
    checkpoint_seconds: float = 60.0
    # under torchrun: seconds a rank waits for the others (rank 0 alone runs data, cache, eval and report meanwhile)
    dist_timeout: float = 6 * 3600.0
    taxonomy: TaxonomyConfig = field(default_factory=TaxonomyConfig)
    data: DataConfig = field(default_factory=DataConfig)
    specialists: SpecialistConfig = field(default_factory=SpecialistConfig)
    cache: CacheConfig = field(default_factory=CacheConfig)
    student: StudentConfig = field(default_factory=StudentConfig)
    stopping: StoppingConfig = field(default_factory=StoppingConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)

    def to_dict(self) -> Dict[str, Any]:
        return dataclasses.asdict(self)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    def runs(self) -> List[str]:
        """Student runs: every method with every head, named '<method>-<head>'."""
        return [f"{m}-{h}" for m in self.student.methods for h in self.student.heads]


def _coerce(path: str, typ, value):
    origin = get_origin(typ)
    if origin is Union:  # Optional[X]
        args = [a for a in get_args(typ) if a is not type(None)]
        if value is None:
            return None
        return _coerce(path, args[0], value)
    if dataclasses.is_dataclass(typ):
        if not isinstance(value, dict):
            raise ConfigError(f"{path}: expected a mapping, got {value!r}")
        return _from_dict(typ, value, path)
    if origin in (list, List):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{path}: expected a list, got {value!r}")
        (inner,) = get_args(typ)
        return [_coerce(f"{path}[{i}]", inner, v) for i, v in enumerate(value)]
    if typ is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{path}: expected true or false, got {value!r}")
        return value
    if typ is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{path}: expected an integer, got {value!r}")
        return value
    if typ is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{path}: expected a number, got {value!r}")
        try:
            value = float(value)
        except OverflowError:
            value = math.inf
        if not math.isfinite(value):
            raise ConfigError(f"{path}: expected a finite number, got {value!r}")
        return value
    if typ is str:
        if not isinstance(value, str):
            raise ConfigError(f"{path}: expected a string, got {value!r}")
        return value
    return value


def _from_dict(cls, data: Dict[str, Any], path: str = ""):
    hints = get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(map(repr, set(data) - names))
    if unknown:
        where = path or "config"
        raise ConfigError(f"{where}: unknown key(s) {', '.join(unknown)}; known: {', '.join(sorted(names))}")
    kwargs = {k: _coerce(f"{path}.{k}" if path else k, hints[k], v) for k, v in data.items()}
    return cls(**kwargs)


def _merge(base: Dict[str, Any], over: Dict[str, Any]) -> Dict[str, Any]:
    out = copy.deepcopy(base)
    for k, v in over.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = _merge(out[k], v)
        else:
            out[k] = copy.deepcopy(v)
    return out


def from_dict(data: Dict[str, Any]) -> RunConfig:
    cfg = _from_dict(RunConfig, data)
    validate(cfg)
    return cfg


MAX_CONFIG_BYTES = 1 << 20


def read_yaml(path: str) -> Dict[str, Any]:
    """A YAML config file as a mapping (empty file: {}); ConfigError naming the file for anything else."""
    where = f"config file {path}"
    try:
        with open(path, "rb") as f:
            raw = f.read(MAX_CONFIG_BYTES + 1)
    except FileNotFoundError:
        raise ConfigError(f"{where} does not exist") from None
    except IsADirectoryError:
        raise ConfigError(f"{where} is a folder, not a file") from None
    except OSError as e:
        raise ConfigError(f"{where}: cannot read it ({e.strerror or e})") from None
    if len(raw) > MAX_CONFIG_BYTES:
        raise ConfigError(f"{where} is larger than {MAX_CONFIG_BYTES >> 20} MiB; not a config")
    try:
        loaded = yaml.safe_load(raw.decode("utf-8"))
    except UnicodeDecodeError:
        raise ConfigError(f"{where} is not UTF-8 text") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        what = getattr(e, "problem", None) or str(e).splitlines()[0]
        at = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        raise ConfigError(f"{where} is not valid YAML: {what}{at}") from None
    except RecursionError:
        raise ConfigError(f"{where} is not valid YAML: nested too deeply") from None
    if loaded is None:
        return {}
    if not isinstance(loaded, dict):
        raise ConfigError(f"{where}: the top level must be a mapping, got {type(loaded).__name__}")
    return loaded


def read_saved(path: str) -> Dict[str, Any]:
    """The config a run folder holds (config.yaml), as a mapping."""
    return read_yaml(path)


def load(preset: str = "default", path: Optional[str] = None, overrides: Optional[Dict[str, Any]] = None) -> RunConfig:
    """A preset, overlaid by a YAML file's keys, overlaid by overrides (e.g. {"seed": 3})."""
    from kc.presets import PRESETS

    if preset not in PRESETS:
        raise ConfigError(f"unknown preset {preset!r}; known: {sorted(PRESETS)}")
    data = copy.deepcopy(PRESETS[preset])
    if path is not None:
        data = _merge(data, read_yaml(path))
    if overrides:
        data = _merge(data, overrides)
    return from_dict(data)


def load_saved(path: str, overrides: Optional[Dict[str, Any]] = None) -> RunConfig:
    """The config saved in a run folder (its config.yaml), overlaid by overrides: what `--resume` alone uses."""
    data = read_saved(path)
    if overrides:
        data = _merge(data, overrides)
    try:
        return from_dict(data)
    except ConfigError as e:
        raise ConfigError(f"{path}: {e}") from None


def _positive(path: str, value, allow_zero: bool = False):
    if value < 0 or (value == 0 and not allow_zero):
        raise ConfigError(f"{path}: must be {'>= 0' if allow_zero else '> 0'}, got {value}")


def _choice(path: str, value, options):
    if value not in options:
        raise ConfigError(f"{path}: must be one of {list(options)}, got {value!r}")


MAX_SEED = 2**32  # seeds feed NumPy and torch generators, and torch's takes 64 bits after kc's arithmetic


def validate(cfg: RunConfig) -> None:
    t, d, sp, st = cfg.taxonomy, cfg.data, cfg.specialists, cfg.student
    if not 0 <= cfg.seed < MAX_SEED:
        raise ConfigError(f"seed: must be in [0, 2**32), got {cfg.seed}")
    _positive("threads", cfg.threads, allow_zero=True)
    _positive("checkpoint_seconds", cfg.checkpoint_seconds, allow_zero=True)
    _positive("dist_timeout", cfg.dist_timeout)
    for path, v in (("specialists.weight_decay", sp.weight_decay), ("student.weight_decay", st.weight_decay)):
        _positive(path, v, allow_zero=True)
    _positive("taxonomy.num_verticals", t.num_verticals)
    _positive("taxonomy.num_classes", t.num_classes)
    if t.file is None and t.num_classes < 2 * t.num_verticals:
        raise ConfigError(f"taxonomy.num_classes ({t.num_classes}) must be at least 2 per vertical "
                          f"({2 * t.num_verticals})")
    _choice("taxonomy.source", t.source, TAXONOMY_SOURCES)
    if t.source == "wordnet":
        if t.file is not None:
            raise ConfigError("taxonomy.file: a taxonomy file and taxonomy.source: wordnet exclude each other; "
                              "give one")
        if not t.wordnet_path:
            raise ConfigError("taxonomy.wordnet_path: give the path of WordNet's data.noun")
        if not t.wordnet_under.strip():
            raise ConfigError("taxonomy.wordnet_under: give a synset (a first word or a wnid like n00001930)")
        _positive("taxonomy.vertical_min_classes", t.vertical_min_classes)
        if t.vertical_max_classes < t.vertical_min_classes:
            raise ConfigError(f"taxonomy.vertical_max_classes ({t.vertical_max_classes}) is below "
                              f"taxonomy.vertical_min_classes ({t.vertical_min_classes})")
        if t.num_classes < t.num_verticals * t.vertical_min_classes:
            raise ConfigError(f"taxonomy.num_classes ({t.num_classes}) cannot hold {t.num_verticals} verticals of "
                              f"taxonomy.vertical_min_classes ({t.vertical_min_classes}) classes")
    if not 0 <= t.coarse_fraction < 0.5:
        raise ConfigError(f"taxonomy.coarse_fraction: must be in [0, 0.5), got {t.coarse_fraction}")
    if not 0 <= t.size_spread < 1:
        raise ConfigError(f"taxonomy.size_spread: must be in [0, 1), got {t.size_spread}")
    _choice("data.kind", d.kind, DATA_KINDS)
    if d.kind != "synthetic" and not d.path:
        raise ConfigError(f"data.path: kind {d.kind!r} reads real data and needs a path")
    if d.kind != "synthetic" and t.file is None:
        raise ConfigError(f"taxonomy.file: real data (data.kind={d.kind!r}) needs its taxonomy file")
    for k in ("modes", "feature_dim", "train_per_class", "test_per_class", "subspace_dim", "shard_size", "image_size"):
        _positive(f"data.{k}", getattr(d, k))
    for k in ("mode_spread", "vertical_separation", "coarse_spread", "sibling_spread", "noise", "isotropic_noise"):
        _positive(f"data.{k}", getattr(d, k), allow_zero=True)
    if d.subspace_dim > d.feature_dim:
        raise ConfigError(f"data.subspace_dim ({d.subspace_dim}) exceeds data.feature_dim ({d.feature_dim})")
    if not 0 <= d.label_noise < 1 or not 0 <= d.noise_spread < 1:
        raise ConfigError("data.label_noise and data.noise_spread must be in [0, 1)")
    _positive("data.val_per_class", d.val_per_class, allow_zero=True)
    if not 0 <= d.val_fraction < 1:
        raise ConfigError(f"data.val_fraction: must be in [0, 1), got {d.val_fraction}")
    if not 0 <= d.multi_vertical <= 1:
        raise ConfigError(f"data.multi_vertical: must be in [0, 1], got {d.multi_vertical}")
    if d.multi_vertical > 0:
        if not 2 <= d.max_verticals <= t.num_verticals:
            raise ConfigError(f"data.max_verticals: must be in [2, taxonomy.num_verticals={t.num_verticals}] when "
                              f"data.multi_vertical > 0, got {d.max_verticals}")
        if d.kind != "synthetic":
            raise ConfigError("data.multi_vertical: the generator's option (data.kind: synthetic); real data "
                              "brings its own labels")
        if any(m.startswith("bayes_") for m in cfg.student.methods):
            raise ConfigError("student.methods: bayes_* methods need single-vertical rows (the posterior models "
                              "one object a row); set data.multi_vertical: 0")
    _positive("stopping.patience", cfg.stopping.patience, allow_zero=True)
    _positive("stopping.min_delta", cfg.stopping.min_delta, allow_zero=True)
    for k in ("epochs", "batch_size"):
        _positive(f"specialists.{k}", getattr(sp, k))
        _positive(f"student.{k}", getattr(st, k))
    for path, v in (("specialists.lr", sp.lr), ("student.lr", st.lr), ("student.scale_lr", st.scale_lr)):
        _positive(path, v)
    if any(h <= 0 for h in sp.hidden + st.backbone_hidden):
        raise ConfigError("specialists.hidden and student.backbone_hidden: every width must be > 0")
    _positive("specialists.background_fraction", sp.background_fraction, allow_zero=True)
    _positive("cache.top_k", cfg.cache.top_k)
    _positive("cache.batch_size", cfg.cache.batch_size)
    _choice("student.backbone", st.backbone, BACKBONES)
    if (st.backbone == "cnn") != (d.kind == "images"):
        raise ConfigError(f"student.backbone: {st.backbone!r} does not fit data.kind {d.kind!r} "
                          "(cnn for images, mlp for features)")
    if not st.heads:
        raise ConfigError("student.heads: give at least one head")
    for i, h in enumerate(st.heads):
        _choice(f"student.heads[{i}]", h, HEADS)
    if not st.methods:
        raise ConfigError("student.methods: give at least one method")
    for i, m in enumerate(st.methods):
        _choice(f"student.methods[{i}]", m, METHODS)
    _choice("student.scale", st.scale, SCALES)
    _choice("student.scale_init", st.scale_init, SCALE_INITS)
    _choice("student.bias_init", st.bias_init, BIAS_INITS)
    _positive("student.scale_init_k", st.scale_init_k)
    _positive("student.scale_init_value", st.scale_init_value)
    if not 0 < st.collapse_dead <= 1:
        raise ConfigError(f"student.collapse_dead: must be in (0, 1], got {st.collapse_dead}")
    _positive("student.collapse_spread", st.collapse_spread, allow_zero=True)
    if any(m.startswith("bayes_") for m in st.methods) and d.kind != "synthetic":
        raise ConfigError("student.methods: bayes_* methods need the synthetic generator's posterior "
                          "(data.kind: synthetic)")
    for k in ("sb", "s1", "s2", "s1s", "s1i", "s2_fc"):
        _positive(f"student.{k}", getattr(st, k))
    if not 0 <= st.shared < st.s2:
        raise ConfigError(f"student.shared: must be in [0, s2={st.s2}), got {st.shared}")
    if not 0 <= st.hard_weight <= 1:
        raise ConfigError(f"student.hard_weight: must be in [0, 1], got {st.hard_weight}")
    for k in ("row_chunk", "class_chunk", "timing_batch"):
        _positive(f"eval.{k}", getattr(cfg.eval, k))
    from kc_kernels.dispatch import BACKENDS  # the library's names; which can run here is checked before a run

    _choice("backend", cfg.backend, BACKENDS)
    if not (cfg.device == "cpu" or cfg.device == "cuda" or
            (cfg.device.startswith("cuda:") and cfg.device[5:].isdigit() and len(cfg.device) < 12)):
        raise ConfigError(f"device: must be 'cpu' or 'cuda[:n]', got {cfg.device!r}")
    check_fits(cfg)


# ---------------------------------------------------------------------------------------------- memory
def physical_memory() -> Optional[int]:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return None


def memory_terms(cfg: RunConfig) -> List[tuple]:
    """(bytes, keys) of the largest memory needs of a run, estimated from its sizes alone (Python integers, so
    absurd sizes cannot overflow), the keys that set each. Upper bounds of the order of what the stages hold at
    once; a taxonomy file's or real data's sizes are unknown here and count as small."""
    t, d, sp, st, ev = cfg.taxonomy, cfg.data, cfg.specialists, cfg.student, cfg.eval
    generated = t.file is None
    N = t.num_classes if generated else 0
    M = t.num_verticals if generated else 1
    D = 3 * d.image_size ** 2 if d.kind == "images" else d.feature_dim
    rows = N * (d.train_per_class + d.test_per_class + d.val_per_class) if d.kind == "synthetic" else 0
    terms = [
        # names, ancestor lists and per-class arrays of the taxonomy; the generator's class codes
        (N * (400 + 4 * d.subspace_dim * (1 + d.modes)), ["taxonomy.num_classes"]),
        (M * (200 + 4 * D * (d.subspace_dim + 1)), ["taxonomy.num_verticals", "data.feature_dim",
                                                     "data.subspace_dim"]),
        # row order, labels (CSR) and their copies
        (64 * rows, ["data.train_per_class" if d.train_per_class >= d.test_per_class else "data.test_per_class",
                     "taxonomy.num_classes"]),
        # one shard of features in the making, with its temporaries
        (16 * min(d.shard_size, max(rows, 1)) * D, ["data.shard_size", "data.feature_dim"]),
        # the teacher cache held in memory (kc.cache.TeacherCache.IN_MEMORY_BYTES at most): int32 + fp16 a target
        (min(6 * N * d.train_per_class * cfg.cache.top_k, 512 << 20) if d.kind == "synthetic" else 0,
         ["cache.top_k", "data.train_per_class"]),
        # splits of feature rows held in memory (kc.data.FeatureShards.IN_MEMORY_BYTES each, at most)
        (min(4 * rows * D, 3 * (256 << 20)) if d.kind != "images" else 0,
         ["data.train_per_class", "data.feature_dim"]),
    ]
    widths = [D] + list(sp.hidden)
    body = sum(a * b for a, b in zip(widths, widths[1:]))
    # every teacher is loaded at once to fill the cache and to be evaluated; one is trained with Adam (x4)
    terms += [(4 * M * body + 16 * body, ["specialists.hidden", "taxonomy.num_verticals"]),
              (20 * widths[-1] * N, ["taxonomy.num_classes", "specialists.hidden"])]
    bb = [D] + list(st.backbone_hidden) + [st.sb]
    backbone = sum(a * b for a, b in zip(bb, bb[1:]))
    terms += [  # student parameters, gradients and Adam's moments (x4 floats)
        (16 * backbone, ["student.backbone_hidden", "student.sb", "data.feature_dim"]),
        (16 * st.sb * (st.s1 + st.s1s + st.s1i * M), ["student.sb", "student.s1", "student.s1s", "student.s1i"]),
        (16 * ((st.s1s + st.s1i) * st.s2 * M + st.s2 * N), ["taxonomy.num_classes", "student.s2"]),
        (16 * st.s2_fc * (st.s1 + N), ["taxonomy.num_classes", "student.s2_fc"]),
    ]
    act = D + sum(sp.hidden) + sum(st.backbone_hidden) + st.sb + st.s1 + st.s1s + st.s2_fc + (st.s1i + st.s2) * M
    terms += [  # activations of a batch (forward and backward), targets
        (16 * sp.batch_size * act, ["specialists.batch_size"]),
        (16 * st.batch_size * (act + 2 * cfg.cache.top_k), ["student.batch_size", "cache.top_k"]),
        (16 * cfg.cache.batch_size * (act + cfg.cache.top_k), ["cache.batch_size", "cache.top_k"]),
        # evaluation: a block of scores, the test scores of a chunk of classes, a timing batch
        (12 * ev.row_chunk * ev.class_chunk, ["eval.row_chunk", "eval.class_chunk"]),
        (12 * N * d.test_per_class * min(ev.class_chunk, max(N, 1)) if d.kind == "synthetic" else 0,
         ["taxonomy.num_classes", "data.test_per_class", "eval.class_chunk"]),
        (8 * ev.timing_batch * (N + act), ["eval.timing_batch", "taxonomy.num_classes"]),
    ]
    return terms


def check_fits(cfg: RunConfig, available: Optional[int] = None) -> None:
    """ConfigError naming the key when the run's estimated memory exceeds this machine's: checked before any
    allocation, so an absurd size is refused at once instead of failing deep in NumPy or running for hours."""
    available = physical_memory() if available is None else available
    if not available:
        return
    terms = memory_terms(cfg)
    total = sum(b for b, _ in terms)
    if total <= available:
        return
    big, keys = max(terms, key=lambda t: t[0])
    values = {k: _value(cfg, k) for k in keys}
    named = ", ".join(f"{k}={v}" for k, v in values.items())
    raise ConfigError(f"{_blame(cfg)}: a run of this size needs about {_gib(total)} of memory, more than this "
                      f"machine's {_gib(available)} (largest part: {_gib(big)} from {named}); choose smaller sizes")


def _value(cfg: RunConfig, key: str):
    obj = cfg
    for part in key.split("."):
        obj = getattr(obj, part)
    return obj


SIZE_KEYS = ("taxonomy.num_classes", "taxonomy.num_verticals", "data.train_per_class", "data.test_per_class",
             "data.feature_dim", "data.subspace_dim", "data.modes", "data.shard_size", "data.image_size",
             "specialists.hidden", "specialists.batch_size", "cache.top_k", "cache.batch_size",
             "student.backbone_hidden", "student.sb", "student.s1", "student.s2", "student.s1s", "student.s1i",
             "student.s2_fc", "student.batch_size", "eval.row_chunk", "eval.class_chunk", "eval.timing_batch")


def _blame(cfg: RunConfig) -> str:
    """The size key whose return to its default value shrinks the estimate most: the one that made it large."""
    usual = RunConfig()
    best, key = None, SIZE_KEYS[0]
    for k in SIZE_KEYS:
        trial = copy.deepcopy(cfg)
        section, name = k.split(".")
        setattr(getattr(trial, section), name, _value(usual, k))
        total = sum(b for b, _ in memory_terms(trial))
        if best is None or total < best:
            best, key = total, k
    return key


def _gib(n: int) -> str:
    return f"{n / 2**30:.3g} GiB" if n < 2**70 else f"2^{n.bit_length() - 1} bytes"
