"""The scaling subcommand: GET and ViT of several sizes from seed studies (by hand, refusals)."""

from __future__ import annotations

import json

import pytest

from examples.get_distillation import scaling, study
from examples.get_distillation.__main__ import main as run_cli

CONFIG = {"pairs": "p", "heldout": "h", "teacher": "t.pt", "num_samples": 1000, "heun_steps": 18}


def _row(model: str, params: int, macs: int, fd: float, psnr: float, acc: float) -> dict:
    return {"run": "r", "model": model, "label": model, "params": params, "macs": macs,
            "quality": {"fd_digits": fd, "class_accuracy": acc}, "teacher_match": {"psnr": psnr}}


def _study(tmp_path, name: str, per_seed: dict[str, list[tuple[float, float, float]]], sizes: dict[str, tuple[int, int]],
           config: dict | None = None, steps: int = 4000):
    """A study folder whose study.json is what run_study writes for these per-seed figures."""
    seeds = len(next(iter(per_seed.values())))
    reports = [{"teacher": {"quality": {"fd_digits": 1.1}},
                "students": [_row(m, *sizes[m], *per_seed[m][s]) for m in per_seed]} for s in range(seeds)]
    figures, missing = study.aggregate(reports)
    result = {"config": {**CONFIG, **(config or {})}, "seeds": list(range(seeds)), "figures": figures, "missing": missing,
              "students": [{"name": m.lower(), "settings": {"model": m, "steps": steps, "lr": 2e-3}} for m in per_seed]}
    folder = tmp_path / name
    folder.mkdir()
    (folder / "study.json").write_text(json.dumps(result))
    return folder


SIZES = {"GET-Nano/4": (100, 4000), "GET-Tiny/4": (400, 16000), "ViT-Nano/4": (110, 1200), "ViT-Small/4": (1600, 19000)}


def test_rows_comparisons_and_files_by_hand(tmp_path):
    a = _study(tmp_path, "a", {"GET-Tiny/4": [(2.0, 20.0, 0.9), (2.2, 21.0, 0.95)],   # FD mean 2.1, std 0.1414
                               "ViT-Nano/4": [(3.0, 18.0, 0.8), (3.4, 18.5, 0.9)]}, SIZES)  # FD 3.2, std 0.2828
    b = _study(tmp_path, "b", {"ViT-Small/4": [(2.05, 22.0, 0.97), (2.25, 22.0, 0.99)],    # FD 2.15
                               "GET-Nano/4": [(1.0, 25.0, 0.99), (1.0, 25.0, 0.99)]}, SIZES)  # FD 1.0, std 0
    assert run_cli(["scaling", "--study", str(a), "--study", str(b), "--out", str(tmp_path / "out")]) == 0
    table = json.loads((tmp_path / "out" / "scaling.json").read_text())
    # sorted by family, then parameters
    assert [r["label"] for r in table["rows"]] == ["GET-Nano/4", "GET-Tiny/4", "ViT-Nano/4", "ViT-Small/4"]
    tiny = table["rows"][1]
    assert tiny["params"] == 400 and tiny["macs"] == 16000 and tiny["family"] == "GET" and tiny["steps"] == 4000
    assert tiny["fd"]["mean"] == pytest.approx(2.1) and tiny["fd"]["std"] == pytest.approx(0.1414, abs=1e-4)
    assert tiny["psnr"]["mean"] == pytest.approx(20.5) and tiny["accuracy"]["mean"] == pytest.approx(0.925)
    assert table["teacher_fd"]["mean"] == pytest.approx(1.1)
    verdicts = {(c["get"], c["vit"]): c for c in table["comparisons"]}
    assert len(verdicts) == 4
    c = verdicts[("GET-Tiny/4", "ViT-Small/4")]  # -0.05 against 0.1414 + 0.1414: level
    assert c["fd_difference"] == pytest.approx(-0.05) and c["std_sum"] == pytest.approx(0.2828, abs=1e-4)
    assert c["verdict"] == "level" and c["param_ratio"] == pytest.approx(4.0) and c["mac_ratio"] == pytest.approx(19 / 16)
    assert verdicts[("GET-Tiny/4", "ViT-Nano/4")]["verdict"] == "GET better"   # -1.1 against 0.42
    assert verdicts[("GET-Nano/4", "ViT-Small/4")]["verdict"] == "GET better"  # -1.15 against 0.14
    text = (tmp_path / "out" / "scaling.md").read_text()
    assert "| GET-Tiny/4 | 0.000M | 0.02M | 4000 | 0.002 | 2.10 +- 0.14 (2.00-2.20) |" in text
    assert "| GET-Tiny/4 | ViT-Small/4 | 4.00x | 1.19x | -0.05 | 0.28 | level |" in text
    assert "teacher's FD-digits: 1.10" in text and (tmp_path / "out" / "scaling.png").stat().st_size > 10_000


def test_a_vit_ahead_by_more_than_the_spread():
    rows = [{"family": "GET", "label": "g", "params": 1, "macs": 1, "fd": {"mean": 3.0, "std": 0.1}},
            {"family": "ViT", "label": "v", "params": 2, "macs": 4, "fd": {"mean": 2.0, "std": 0.2}}]
    [c] = scaling.compare(rows)
    assert c["verdict"] == "ViT better" and c["fd_difference"] == pytest.approx(1.0)
    rows[1]["fd"]["std"] = 0.9  # 1.0 against 1.0: not larger, so level
    assert scaling.compare(rows)[0]["verdict"] == "level"
    rows[1]["fd"].update(mean=2.5, std=0.1)  # ahead by 0.5 against 0.2: still the ViT
    assert scaling.compare(rows)[0]["verdict"] == "ViT better"


def test_rows_of_evaluate_labels_train_seconds_and_no_teacher(tmp_path):
    a = _study(tmp_path, "a", {"GET-Tiny/4": [(2.0, 20.0, 0.9)]}, SIZES)
    result = json.loads((a / "study.json").read_text())
    figures = result["figures"]
    figures["GET-Tiny/4 (seed-0)"] = figures.pop("GET-Tiny/4")  # evaluate's label for a run of a preset
    figures["GET-Tiny/4 (seed-0)"]["train_seconds"] = study.spread([30.0, 50.0])
    del figures["teacher"]
    [row] = scaling.collect([(str(a), result)])["rows"]
    assert row["model"] == "GET-Tiny/4" and row["label"] == "GET-Tiny/4 (seed-0)" and row["train_seconds"] == 40.0
    assert scaling.collect([(str(a), result)])["teacher_fd"] is None
    del figures["GET-Tiny/4 (seed-0)"]["train_seconds"]
    assert "train_seconds" not in scaling.collect([(str(a), result)])["rows"][0]


def test_a_student_without_settings_and_a_study_without_students_are_named(tmp_path):
    a = _study(tmp_path, "a", {"GET-Tiny/4": [(2.0, 20.0, 0.9)]}, SIZES)
    result = json.loads((a / "study.json").read_text())
    result["figures"]["ViT-Huge/4"] = result["figures"]["GET-Tiny/4"]
    with pytest.raises(ValueError, match=f"^{a}: no student settings for 'ViT-Huge/4'$"):
        scaling.collect([(str(a), result)])
    result["figures"] = {"teacher": result["figures"]["teacher"]}
    with pytest.raises(ValueError, match="^the studies hold no students$"):
        scaling.collect([(str(a), result)])


def test_the_figure_has_a_line_per_family_and_the_teacher(tmp_path):
    a = _study(tmp_path, "a", {"GET-Tiny/4": [(2.0, 20.0, 0.9)], "ViT-Nano/4": [(3.0, 18.0, 0.8)]}, SIZES)
    table = scaling.collect([(str(a), json.loads((a / "study.json").read_text()))])
    fig = scaling.figure(table)
    axes = fig.axes
    assert len(axes) == 4 and all(ax.get_xscale() == "log" for ax in axes)
    assert [t.get_text() for t in axes[0].get_legend().get_texts()] == ["teacher", "GET", "ViT"]
    assert [t.get_text() for t in axes[2].get_legend().get_texts()] == ["GET", "ViT"]
    assert axes[1].get_xlabel().startswith("MACs") and "FD-digits" in axes[0].get_ylabel()


@pytest.mark.parametrize("key", ["pairs", "teacher", "heldout", "num_samples", "heun_steps"])
def test_studies_that_do_not_compare_are_refused(tmp_path, key):
    a = _study(tmp_path, "a", {"GET-Tiny/4": [(2.0, 20.0, 0.9)]}, SIZES)
    b = _study(tmp_path, "b", {"ViT-Nano/4": [(3.0, 18.0, 0.8)]}, SIZES, config={key: 7})
    with pytest.raises(ValueError, match=f"differ in {key} .*; their figures do not compare$"):
        scaling.run(scaling.ScalingConfig(out=str(tmp_path / "o"), studies=[str(a), str(b)]))
    assert not (tmp_path / "o").exists()


def test_a_study_without_macs_is_named(tmp_path):
    a = _study(tmp_path, "a", {"GET-Tiny/4": [(2.0, 20.0, 0.9)]}, SIZES)
    result = json.loads((a / "study.json").read_text())
    del result["figures"]["GET-Tiny/4"]["macs"]
    del result["figures"]["GET-Tiny/4"]["params"]
    (a / "study.json").write_text(json.dumps(result))
    with pytest.raises(ValueError, match=r"GET-Tiny/4 lacks params, macs \(a study from before MACs were reported\? "
                                         r"rerun its evaluations\)$"):
        scaling.run(scaling.ScalingConfig(out=str(tmp_path / "o"), studies=[str(a)]))


def test_the_same_preset_in_two_studies_is_named_by_study(tmp_path):
    a = _study(tmp_path, "a", {"GET-Tiny/4": [(2.0, 20.0, 0.9)]}, SIZES)
    b = _study(tmp_path, "b", {"GET-Tiny/4": [(2.5, 20.0, 0.9)]}, SIZES)
    table = scaling.run(scaling.ScalingConfig(out=str(tmp_path / "o"), studies=[str(a), str(b)]))
    assert sorted(r["label"] for r in table["rows"]) == ["GET-Tiny/4 [a]", "GET-Tiny/4 [b]"]


def test_bad_arguments_are_one_line_errors(tmp_path, capsys):
    assert run_cli(["scaling", "--out", str(tmp_path / "o")]) == 1
    assert "give at least one --study folder" in capsys.readouterr().err
    assert run_cli(["scaling", "--out", str(tmp_path / "o"), "--study", str(tmp_path)]) == 1
    assert "no study.json there" in capsys.readouterr().err
