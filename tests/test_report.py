"""The plots keep their legends and notes off the data: a small split's points can land anywhere on the axes."""

from __future__ import annotations

import numpy as np
import pytest

from fercache import metrics, report


@pytest.fixture
def drawn(monkeypatch):
    """The figures the report functions would save, laid out and drawn as saving would."""
    figs = []

    def keep(fig, path, dpi, margins=None):
        if margins:  # a plot drawn once per run: fixed margins, as _save lays it out
            fig.subplots_adjust(**margins)
        else:
            fig.tight_layout()
        fig.canvas.draw()
        figs.append(fig)
        return path

    monkeypatch.setattr(report, "_save", keep)
    return figs


def _legend_under_every_axes(fig):
    renderer = fig.canvas.get_renderer()
    legends = [ax.get_legend() for ax in fig.axes if ax.get_legend()]
    assert len(legends) == 1
    box = legends[0].get_window_extent(renderer)
    assert all(box.y1 < ax.get_window_extent(renderer).y0 for ax in fig.axes)  # under the axes
    assert box.y0 >= 0  # and still inside the figure
    assert not [t for ax in fig.axes for t in ax.texts]  # no free text over the curves
    return [t.get_text() for t in legends[0].get_texts()]


def test_the_training_plot_names_the_kept_epoch_under_the_axes(drawn, tmp_path):
    # a loss that ends near 0 and a validation dip at the bottom: where the kept-epoch label used to be drawn
    history = [{"epoch": e, "loss": 1 / e**2, "val_accuracy": 0.5 - 0.2 * (e == 6) + 0.01 * e} for e in range(1, 11)]
    report.training_png(tmp_path / "t.png", history, "accuracy", 4, "t")
    assert _legend_under_every_axes(drawn[0]) == ["train loss", "val accuracy", "kept: epoch 4"]


def test_the_reliability_diagram_keeps_legend_and_reading_note_under_both_panels(drawn, tmp_path):
    # 40 predictions: bins at low confidence and full accuracy, the upper-left corner where the legend was
    rng = np.random.default_rng(0)
    prob = rng.dirichlet(np.ones(7) * 0.7, size=40)
    y = prob.argmax(1)
    result = {"reliability": metrics.reliability(prob, y), "ece": metrics.ece(prob, y),
              "reliability_ts": metrics.reliability(prob, y), "ece_ts": 0.05, "temperature": 1.5}
    report.reliability_png(tmp_path / "r.png", result, "t")
    labels = _legend_under_every_axes(drawn[0])
    assert labels[0].startswith("raw softmax: ECE ") and labels[1] == "T = 1.50 (fit on val): ECE 5.0%"
    assert "over-confident" in drawn[0].axes[1].get_legend().get_title().get_text()


def test_durations_read_at_the_precision_anyone_reads_them():
    from fercache.report import duration

    assert [duration(x) for x in (0.04, 9.94, 12.4, 59.6, 192.4, 3599.4, 3725)] == [
        "0.0 s", "9.9 s", "12 s", "1 min 00 s", "3 min 12 s", "59 min 59 s", "1 h 02 min"]
