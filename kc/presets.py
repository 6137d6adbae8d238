"""Named presets: overrides of the dataclass defaults in kc.config (which are the `default` preset)."""

PRESETS = {
    # 8 verticals, 400 classes, MLP on synthetic features: the whole method in a few minutes on 2 CPU cores.
    "default": {},
    # The paper's scale: 20 verticals, 100,000 classes. Two samples per fine class, one epoch and one student
    # (FC-SC, distilled) keep it to one CPU machine. The self-paced scale is left out here: with 5,000 classes a
    # vertical and gamma starting at sqrt(N_v), one epoch does not let gamma grow before the normalised logits
    # drive the student to an input-independent output; add methods/epochs where there is time or a GPU.
    "eft-100k": {
        "name": "eft-100k",
        "threads": 0,
        "taxonomy": {"num_verticals": 20, "num_classes": 100_000, "coarse_fraction": 0.1, "size_spread": 0.5},
        "data": {"feature_dim": 64, "train_per_class": 2, "test_per_class": 1, "subspace_dim": 24,
                 "noise_spread": 0.4},
        "specialists": {"hidden": [256], "epochs": 3, "batch_size": 512, "background_fraction": 0.25},
        "cache": {"top_k": 100, "batch_size": 2048},
        "student": {"heads": ["fc_sc"], "methods": ["distilled"], "epochs": 1, "batch_size": 512, "s2": 32,
                    "s1s": 256, "sb": 256, "backbone_hidden": [256]},
        "eval": {"row_chunk": 4096, "class_chunk": 512, "timing_batch": 64},
    },
    # Seconds, for smoke tests of the pipeline.
    "tiny": {
        "name": "tiny",
        "taxonomy": {"num_verticals": 3, "num_classes": 30},
        "data": {"feature_dim": 16, "train_per_class": 6, "test_per_class": 3, "subspace_dim": 4},
        "specialists": {"hidden": [32], "epochs": 2, "batch_size": 64},
        "cache": {"top_k": 5},
        "student": {"backbone_hidden": [32], "sb": 32, "s1": 16, "s2": 8, "s1s": 16, "s1i": 8, "s2_fc": 8,
                    "shared": 2, "epochs": 2, "batch_size": 64},
        "eval": {"row_chunk": 37, "class_chunk": 7, "timing_batch": 16},
    },
}
