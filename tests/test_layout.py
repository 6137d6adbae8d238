"""One source for the constants shared by Python, C++, CUDA and Triton: the IntEnums of kc_kernels.layout and
kc_kernels.loss_modes against the X-macro lists the extensions export, and the Triton mirror against both."""
import pytest

from kc_kernels import layout
from kc_kernels.layout import NORM_EPS, Const, Phase, ScaleKind, State
from kc_kernels.loss_modes import TERMS, LossMode

LIBS = []
for _name in ("_C", "_cuda"):
    try:
        LIBS.append(__import__(f"kc_kernels.{_name}", fromlist=[_name]))
    except ImportError:
        pass


@pytest.mark.parametrize("lib", LIBS, ids=[lib.__name__ for lib in LIBS])
def test_extension_enums_are_the_python_ones(lib):
    for table, enum in ((lib.STATES, State), (lib.CONSTS, Const), (lib.PHASES, Phase),
                        (lib.SCALE_KINDS, ScaleKind), (lib.LOSS_MODES, LossMode)):
        assert table == {m.name: int(m) for m in enum}, enum.__name__
    assert lib.NORM_EPS == NORM_EPS


def test_a_stale_extension_is_refused():
    class Stale:
        STATES = {m.name: int(m) for m in State}
        CONSTS = {m.name: int(m) for m in Const}
        PHASES = {m.name: int(m) for m in Phase}
        SCALE_KINDS = {m.name: int(m) for m in ScaleKind}
        LOSS_MODES = {"SIGMOID": 0, "SOFTMAX": 1, "KL": 2, "REVERSE_KL": 3, "JSD": 4, "TOPK": 5}
        NUM_STATES, NUM_CONSTS, NORM_EPS = layout.NUM_STATES, layout.NUM_CONSTS, layout.NORM_EPS

    layout.check_layout(type("Fresh", (Stale,), {"LOSS_MODES": {m.name: int(m) for m in LossMode}}), "fresh")
    with pytest.raises(ImportError, match="LossMode.TOPK"):
        layout.check_layout(Stale, "stale")


def test_triton_mirror_of_the_loss_modes():
    pytest.importorskip("triton")
    from kc_kernels.triton import loss_modes as tlm

    assert {m.name: getattr(tlm, m.name).value for m in LossMode} == {m.name: int(m) for m in LossMode}


def test_every_mode_has_its_terms_and_a_name():
    assert set(TERMS) == set(LossMode)
    for m in LossMode:
        assert LossMode.of(m.name.lower()) is m
