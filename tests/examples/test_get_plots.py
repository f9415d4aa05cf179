"""The example's figures read on their own: a title, labelled axes, a legend entry for every
line, no offset text on an axis; sample grids name the model, its NFE and each column's class."""

from __future__ import annotations

import io
import json

import torch

from examples.get_distillation import report
from examples.get_distillation.images import grid_figure, save_image_grid


def _drawn(fig):
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")  # draws it, so tick and offset texts are final
    assert buffer.getvalue()[:8] == b"\x89PNG\r\n\x1a\n"
    return fig


def _check_axes(ax):
    assert ax.get_title() and ax.get_xlabel() and ax.get_ylabel()
    assert ax.yaxis.get_offset_text().get_text() == "" and ax.xaxis.get_offset_text().get_text() == ""
    legend = ax.get_legend()
    assert legend is not None
    labels = [t.get_text() for t in legend.get_texts()]
    assert len(labels) == len(ax.lines) and all(labels), labels


def _sweep_row():
    # values within 1e-4 of each other: matplotlib's default formatter would show an offset
    psnr = [-0.98984, -0.98973, -0.98969]
    return {"label": "GET-Tiny/4", "train_max_steps": 6, "teacher_match": {"n": 32},
            "nfe_sweep": {"nfe": [1, 2, 3], "fd_samples": 300,
                          "FixedPoint": {"psnr": psnr, "fd_digits": [1206.58, 1206.25, 1206.14]},
                          "Anderson(m=5)": {"psnr": psnr, "fd_digits": [1206.58, 1206.25, 1206.19]}}}


def test_the_nfe_sweep_figure_has_titles_labelled_lines_and_no_offset():
    fig = _drawn(report.nfe_sweep_figure(_sweep_row()))
    assert fig.get_suptitle().startswith("GET-Tiny/4")
    assert len(fig.axes) == 2
    for ax in fig.axes:
        _check_axes(ax)
        assert "(dB" in ax.get_ylabel() or "FD" in ax.get_ylabel()


def test_the_loss_figure_compares_the_output_loss_of_every_run(tmp_path):
    runs, rows = [], []
    for name, values in (("get", [6.5, 6.0, 5.5]), ("vit", [1.7, 1.6, 1.5])):
        run = tmp_path / name
        run.mkdir()
        records = [{"step": i + 1, "loss": v, "output_loss": v / 4} for i, v in enumerate(values)]
        (run / "log.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
        runs.append(str(run))
        rows.append({"label": name, "model": name})
    old = tmp_path / "old"  # a log from before output_loss was logged: named, not plotted
    old.mkdir()
    (old / "log.jsonl").write_text(json.dumps({"step": 1, "loss": 6.0}) + "\n")
    fig = _drawn(report.loss_figure([*runs, str(old)], [*rows, {"label": "old", "model": "GET-Tiny/4"}]))
    (ax,) = fig.axes
    _check_axes(ax)
    assert len(ax.lines) == 2
    # the output's loss, not the objective (GET's sum over iterates is on another scale)
    assert [list(line.get_ydata()) for line in ax.lines] == [[1.625, 1.5, 1.375], [0.425, 0.4, 0.375]]
    assert "L1" in ax.get_ylabel() and "not logged: old" in ax.get_title()
    assert all("10^" not in t.get_text() and "times" not in t.get_text() for t in ax.get_yticklabels())


def test_sample_grids_carry_a_title_and_the_class_of_each_column(tmp_path):
    images = torch.rand(20, 1, 8, 8) * 2 - 1
    title = "teacher: EDM Heun sampler, 7 NFE"
    fig = _drawn(grid_figure(images, title=title, labels=torch.arange(20) % 10, nrow=10))
    (ax,) = fig.axes
    assert ax.get_title() == title and "class" in ax.get_xlabel() and ax.get_ylabel()
    assert [t.get_text() for t in ax.get_xticklabels()] == [str(k) for k in range(10)]
    # columns that mix classes (8 to a row, 10 classes): each image's class is written on it
    fig = grid_figure(images[:16], title=title, labels=torch.arange(16) % 10, nrow=8)
    assert sorted(t.get_text() for t in fig.axes[0].texts) == sorted(str(k % 10) for k in range(16))
    save_image_grid(images, tmp_path / "grid.png", title=title, labels=None, nrow=10)
    assert (tmp_path / "grid.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
