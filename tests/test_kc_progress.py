"""A stage's one bar: its total follows the sizes its items announce, resumed and skipped work moves it without
raising its rate, an item that stops early ends at its size; and the summary line of each stage."""
import io

from tqdm import tqdm

from kc import progress


def factory(**kw):
    return tqdm(file=io.StringIO(), mininterval=0, **kw)


def test_bar_follows_the_items():
    st = progress.Stage(factory, "students", items=3)
    bar = st.bar
    with st.item():
        p = st.part(total=10, desc="a")
        assert bar.total == 30  # the two items not begun are estimated at the announced mean
        for _ in range(10):
            p.update(1)
        p.close()
    assert (bar.n, bar.total) == (10, 30)
    with st.item():  # resumed: 4 of 20 done before; rate counts only the 16 done now
        p = st.part(total=20, initial=4, desc="b")
        assert bar.n == 14 and bar.initial == 4 and bar.total == 45
        for _ in range(6):  # stops early (a model that stops on its validation mAP): ends at its size
            p.update(1)
        p.close()
    assert (bar.n, bar.total) == (30, 45)
    with st.item():  # skipped whole: moves by the estimate, counted as done before
        pass
    assert bar.n == bar.total == 45 and bar.initial == 4 + 10 + 15  # resumed, stopped early, skipped
    st.close()


def test_iterable_part_and_no_bar():
    st = progress.Stage(factory, "evaluation", items=2)
    for _ in range(2):
        with st.item():
            assert list(st.part(range(5), desc="AP")) == list(range(5))
    assert st.bar.n == st.bar.total == 10
    off = progress.Stage(None, "evaluation", items=2)  # no factory: parts still run their code
    with off.item():
        assert list(off.part(range(3))) == [0, 1, 2]


def test_summary_lines():
    assert progress.summary("data", {"train": 10, "val": 2, "test": 5}) == \
        "10 training, 2 validation and 5 test samples"
    assert progress.summary("student", {"a": {"seconds": 3.2}, "b": {"seconds": 5.9}, "processes": 2}) == \
        "2 students, 3-6s each"
    line = progress.summary("eval", {"map": {"generalist-fc_fc": 0.4, "distilled-fc_sc": 0.5, "specialists": 0.6}})
    assert line == "3 models; best student distilled-fc_sc mAP 50.00%, specialists 60.00%"
    assert progress.summary("report", {"files": {"table": "/x/report/results.md"}}) == "1 files in /x/report"
    assert progress.summary("cache", {}) == ""  # info from another version says less, never fails
