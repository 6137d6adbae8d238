"""The label space a run's `taxonomy:` config describes: its file when one is given, else disjoint subtrees of
WordNet's noun hierarchy (source: wordnet) or a generated two-level taxonomy (source: generate).

Here rather than in kc/taxonomy.py, so that kc/wordnet.py (which builds a Taxonomy) and kc/taxonomy.py do not import
each other.
"""
from __future__ import annotations

from kc import wordnet
from kc.taxonomy import Taxonomy, TaxonomyError, generate, load


def from_config(t, seed: int) -> Taxonomy:
    """The Taxonomy of a kc.config.TaxonomyConfig (seed: a generated taxonomy's)."""
    if t.file:
        return load(t.file)
    if t.source == "wordnet":
        return wordnet.taxonomy_from_wordnet(t.wordnet_path, num_verticals=t.num_verticals, max_classes=t.num_classes,
                                             min_size=t.vertical_min_classes, max_size=t.vertical_max_classes,
                                             under=t.wordnet_under, instances=t.wordnet_instances)
    if t.source != "generate":
        raise TaxonomyError(f"taxonomy.source: must be 'generate' or 'wordnet', got {t.source!r}")
    return generate(t.num_verticals, t.num_classes, coarse_fraction=t.coarse_fraction, size_spread=t.size_spread,
                    seed=seed)
