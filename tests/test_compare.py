"""compare.py, the f-VAE paper's experiment: at tiny sizes it writes every output; its
presets match the models' trainable parameters within 15 %."""

import dataclasses
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import imageio.v3 as iio

from conftest import ROOT
from test_same_weights import write_pictures
import cli
import common
import compare
import face_runs
import speedups
from training.monitor import count_parameters


def counts(preset):
    """Trainable parameters of the preset's three models, built from their command lines."""
    found = {}
    for name in compare.PRESETS[preset]["models"]:
        face_model = compare.MODELS[name]
        args = face_runs.parse_args(face_model, [
            *compare.PRESETS[preset]["models"][name],
            "--img-size", str(compare.PRESETS[preset]["img_size"]), "--seed", "0", "--out", "unused"])
        config = cli.config_from_args(face_model.config_class, args)
        config = dataclasses.replace(config, jit_compile=False)
        model = face_model.build(config)
        found[name] = count_parameters(model.trainable_weights) + speedups.dead_taps(model)
        found[f"{name} (live)"] = count_parameters(model.trainable_weights)
    return found


@pytest.mark.slow
def test_reduced_preset_matches_parameters_within_15_percent():
    found = counts("reduced")
    assert found == {"fvae": 8_814_338, "glow": 9_417_660, "vae": 8_707_874,  # the author's
                     "fvae (live)": 5_668_610, "glow (live)": 9_417_660, "vae (live)": 8_707_874}
    for name in ("glow", "vae"):
        assert abs(found[name] / found["fvae"] - 1) < 0.15


@pytest.mark.slow
def test_paper_preset_matches_parameters_within_15_percent():
    found = counts("paper")
    assert found == {"fvae": 95_830_082, "glow": 98_985_732, "vae": 96_204_290,
                     "fvae (live)": 58_081_346, "glow (live)": 98_985_732,
                     "vae (live)": 96_204_290}


@pytest.mark.slow
def test_tiny_comparison_writes_every_output_and_resumes(tmp_path):
    pictures = write_pictures(str(tmp_path / "faces"), n=14)
    out = tmp_path / "compare"
    argv = ["--preset", "tiny", "--data-dir", pictures, "--out", str(out), "--holdout", "4"]
    assert compare.main(argv) == 0
    results = json.load(open(out / "compare.json"))
    assert sorted((r["model"], r["epoch"]) for r in results["rows"]) == sorted(
        (m, e) for m in ("fvae", "glow", "vae") for e in (1, 2))
    for row in results["rows"]:
        assert np.isfinite(row["bits_per_dim"]) and row["held_out_images"] == 4
        assert row["samples"] == (1 if row["model"] == "glow" else 4)
        # the VAEs' bound at the fitted decoder scale; Glow has no decoder
        assert (row["bits_per_dim_fitted_t_x"] is None) == (row["model"] == "glow")
    for name in ("fvae", "glow", "vae"):  # training wall time adds up over the epochs
        first, second = sorted((r for r in results["rows"] if r["model"] == name),
                               key=lambda r: r["epoch"])
        assert 0 < first["seconds"] < second["seconds"]
        assert second["seconds"] == pytest.approx(
            first["seconds"] + second["seconds_per_step"] * 2, rel=1e-6)
    table = (out / "compare.md").read_text()
    assert "| fvae |" in table and "| glow |" in table and "| vae |" in table
    assert "## At equal steps" in table and "## At equal wall time" in table
    assert "\n| 4 | " in table  # the row of the second checkpoint
    assert iio.imread(out / "bits_per_dim.png").ndim == 3
    assert iio.imread(out / "samples.png").shape[1] == 8 * 16
    for name in ("fvae", "vae"):
        assert (out / name / "reconstruct_pairs.png").is_file()
    for name in ("fvae", "glow", "vae"):  # scored by evaluate, not inside the training time
        assert "held_out" not in (out / name / "log.csv").read_text().splitlines()[0]
    assert compare.main(argv) == 0  # everything done: nothing trained again
    assert len(json.load(open(out / "compare.json"))["rows"]) == 6
    before, shape = (out / "compare.json").read_text(), iio.imread(out / "samples.png").shape
    for name in ("compare.md", "bits_per_dim.png", "samples.png"):
        os.remove(out / name)
    assert compare.main([*argv, "--report"]) == 0  # the outputs again, nothing trained
    assert (out / "compare.json").read_text() == before
    assert (out / "compare.md").read_text() == table
    assert iio.imread(out / "samples.png").shape == shape
    # sample quality of the latest weights (the tiny preset keeps no checkpoints), once
    quality = [*argv, "--report", "--quality-features", "dim-cifar10", "--quality-samples", "10"]
    assert compare.main(quality) == 0
    scored = json.load(open(out / "quality.json"))
    assert sorted(r["model"] for r in scored["rows"]) == ["fvae", "glow", "vae"]
    assert all(r["steps"] == 4 and 0 <= r["T0.8"]["recall"] <= 1 for r in scored["rows"])
    assert "| training faces (floor) |" in (out / "quality.md").read_text()
    assert iio.imread(out / "quality.png").ndim == 3
    assert compare.main(quality) == 0 and json.load(open(out / "quality.json")) == scored


def test_report_of_an_empty_comparison_is_a_one_line_error(tmp_path, capsys):
    argv = ["--preset", "tiny", "--data-dir", str(tmp_path), "--out", str(tmp_path / "c"),
            "--report"]
    with pytest.raises(SystemExit) as stopped:
        compare.main(argv)
    assert stopped.value.code == 2
    err = capsys.readouterr().err
    assert "--report" in err and err.count("\n") == 1
    assert not os.path.exists(tmp_path / "c" / "compare.json")


def test_the_calibrated_presets_differ_only_in_the_decoder_scale():
    for preset, name in (("calibrated", "fvae"), ("calibrated-vae", "vae")):
        models = compare.PRESETS[preset]["models"]
        assert models[f"{name}_calibrated"] == [*models[name], "--decoder-scale", "calibrated"]
        assert models[name] == compare.REDUCED_MODELS[name]
        assert compare.PRESETS[preset]["keep_checkpoints"]


def test_the_long_preset_trains_glow_for_the_f_vaes_wall_time():
    """The models take turns; Glow, matched to the f-VAE's wall time, trains an epoch while its
    training seconds are below the f-VAE's, and stops once it has caught up with the end."""
    preset = dict(compare.PRESETS["long"], epochs=3)
    seconds = {"fvae": 100.0, "vae": 250.0, "glow": 170.0}  # one epoch's training time
    rows, order = [], []
    for name, epoch in compare.turns(preset, rows):
        rows.append({"model": name, "epoch": epoch, "seconds": seconds[name] * epoch,
                     "steps": epoch * compare.model_steps_per_epoch(preset, name)})
        order.append((name, epoch))
    # after the f-VAE's 200 s Glow (170 s) is behind and trains; after its 300 s (Glow 340 s) not
    assert order == [("fvae", 1), ("glow", 1), ("vae", 1), ("fvae", 2), ("glow", 2), ("vae", 2),
                     ("fvae", 3), ("vae", 3)]
    # Glow ends with 340 s against the f-VAE's 300: within one of its epochs, never short
    assert [r["steps"] for r in rows if r["model"] == "glow"] == [125, 250]
    assert [r["steps"] for r in rows if r["model"] == "fvae"] == [1000, 2000, 3000]
    assert compare.next_epoch(compare.PRESETS["reduced"], rows, "glow") == 3  # reduced: steps


def test_a_resumed_comparison_goes_on_with_the_model_whose_turn_it_was():
    """Stopped after the f-VAE's first epoch was scored (Glow's was cut short): Glow finishes
    its epoch first, then the VAE, as in the uninterrupted order, not the f-VAE's second."""
    preset = dict(compare.PRESETS["reduced"], epochs=2)
    rows = [{"model": "fvae", "epoch": 1, "seconds": 100.0, "steps": 200}]
    order = []
    for name, epoch in compare.turns(preset, rows):
        rows.append({"model": name, "epoch": epoch, "seconds": 100.0 * epoch, "steps": 0})
        order.append((name, epoch))
    assert order == [("glow", 1), ("vae", 1), ("fvae", 2), ("glow", 2), ("vae", 2)]
    rows = rows[:3]  # stopped after the VAE's first: the f-VAE's second is next
    assert next(compare.turns(preset, rows)) == ("fvae", 2)


def test_tables_at_equal_steps_and_at_equal_wall_time():
    def row(name, steps, seconds, bpd, fitted=None):
        return {"model": name, "epoch": 1, "steps": steps, "seconds": seconds,
                "seconds_per_step": 0.1, "bits_per_dim": bpd, "bits_per_dim_fitted_t_x": fitted,
                "samples": 1 if name == "glow" else 16, "trainable_parameters": 10}
    rows = [row("fvae", 1000, 100, 8.0, 7.0), row("fvae", 2000, 200, 7.5, 6.5),
            row("glow", 125, 150, 6.0), row("glow", 250, 210, 5.5)]
    text = compare.tables(rows, ["fvae", "glow", "vae"])
    assert "| steps | fvae | glow |" in text  # a model without rows has no column
    assert "| 1000 | 8.000 (7.000) |  |" in text and "| 250 |  | 5.500 |" in text
    # at the f-VAE's 100 s Glow's nearest checkpoint is its first (150 s); at 200 s the one of
    # 210 s, nearer than 150 s though later
    assert "| 100 | 8.000 (7.000), 1000 steps, 100 s | 6.000, 125 steps, 150 s |" in text
    assert "| 200 | 7.500 (6.500), 2000 steps, 200 s | 5.500, 250 steps, 210 s |" in text


def test_a_tie_at_equal_wall_time_goes_to_the_earlier_checkpoint():
    """Glow's checkpoints at 150 s and 250 s are as near to the f-VAE's 200 s: the earlier."""
    rows = [{"model": name, "epoch": 1, "steps": steps, "seconds": seconds,
             "seconds_per_step": 0.1, "bits_per_dim": bpd, "samples": 1,
             "trainable_parameters": 10}
            for name, steps, seconds, bpd in [("fvae", 2000, 200, 7.5), ("glow", 125, 150, 6.0),
                                              ("glow", 250, 250, 5.5)]]
    text = compare.tables(rows, ["fvae", "glow"])
    assert "| 200 | 7.500, 2000 steps, 200 s | 6.000, 125 steps, 150 s |" in text


def test_an_interrupted_epoch_keeps_its_training_time_and_a_trained_one_is_not_trained_again(
        tmp_path, monkeypatch):
    """The clock moves only while a model trains; the f-VAE's first epoch is interrupted
    after 30 s and resumed for 20 s more, then its scoring fails once: 50 s, trained once more."""
    clock, trained, failures = [0.0], [], {"train": 1, "evaluate": 1}

    def fake_run(script, argv):
        if argv[0] in ("evaluate", "reconstruct"):
            if argv[0] == "evaluate" and failures["evaluate"]:
                failures["evaluate"] -= 1
                raise RuntimeError("evaluate failed")
            run_dir = argv[argv.index("--out") + 1]
            os.makedirs(run_dir, exist_ok=True)
            common.write_json(os.path.join(run_dir, "evaluate.json"),
                              {"bits_per_dim": 8.0, "images": 4})
            return
        name = os.path.basename(argv[argv.index("--out") + 1])
        trained.append(name)
        clock[0] += 30.0 if failures["train"] else 20.0
        if failures["train"]:
            failures["train"] -= 1
            raise common.TrainingStopped("SIGINT: saved after step 1")

    monkeypatch.setattr(compare, "run_script", fake_run)
    monkeypatch.setattr(compare.time, "time", lambda: clock[0])
    monkeypatch.setattr(compare, "trainable_parameters", lambda model, run_dir: 10)
    monkeypatch.setattr(compare, "write_outputs", lambda *a: None)
    monkeypatch.setitem(compare.PRESETS, "tiny", dict(compare.PRESETS["tiny"], epochs=1))
    argv = ["--preset", "tiny", "--data-dir", str(tmp_path), "--out", str(tmp_path / "c")]
    with pytest.raises(common.TrainingStopped):
        compare.compare(compare.parse_args(argv))
    with pytest.raises(RuntimeError, match="evaluate failed"):
        compare.compare(compare.parse_args(argv))
    results = compare.compare(compare.parse_args(argv))
    assert trained == ["fvae", "fvae", "glow", "vae"]  # not a third time after the failed scoring
    fvae, = [r for r in results["rows"] if r["model"] == "fvae"]
    assert fvae["seconds"] == 50.0
    # the tables are written after every scored epoch, not only at the end (faked here)
    assert "| fvae |" in (tmp_path / "c" / "compare.md").read_text()
    with pytest.raises(common.UsageError, match="preset 'tiny', not 'reduced'"):
        compare.compare(compare.parse_args(["--preset", "reduced", *argv[2:]]))


def test_report_writes_the_outputs_of_an_interrupted_comparison_and_trains_nothing(
        tmp_path, monkeypatch):
    """Glow's first epoch is interrupted; --report then writes the outputs from the f-VAE's
    scored epoch without training anything."""
    trained, written = [], []

    def fake_run(script, argv):
        run_dir = argv[argv.index("--out") + 1]
        os.makedirs(run_dir, exist_ok=True)
        if argv[0] == "evaluate":
            common.write_json(os.path.join(run_dir, "evaluate.json"),
                              {"bits_per_dim": 8.0, "images": 4})
        elif argv[0] != "reconstruct":
            trained.append(os.path.basename(run_dir))
            if trained[-1] == "glow":
                raise common.TrainingStopped("SIGINT: saved after step 1")

    monkeypatch.setattr(compare, "run_script", fake_run)
    monkeypatch.setattr(compare, "trainable_parameters", lambda model, run_dir: 10)
    monkeypatch.setattr(compare, "write_outputs", lambda out, results, preset: written.append(
        [r["model"] for r in results["rows"]]))
    argv = ["--preset", "tiny", "--data-dir", str(tmp_path), "--out", str(tmp_path / "c")]
    with pytest.raises(common.TrainingStopped):
        compare.compare(compare.parse_args(argv))
    assert trained == ["fvae", "glow"] and written == []
    compare.compare(compare.parse_args([*argv, "--report"]))
    assert trained == ["fvae", "glow"] and written == [["fvae"]]


def test_the_plot_says_which_lines_are_bounds_and_which_is_exact():
    rows = [{"model": name, "epoch": epoch, "steps": 200 * epoch, "seconds": 60.0 * epoch,
             "bits_per_dim": 5.0 - epoch / 10, "samples": 1 if name == "glow" else 16,
             "bits_per_dim_fitted_t_x": None if name == "glow" else 4.9 - epoch / 10}
            for name in ("fvae", "glow", "vae") for epoch in (1, 2)]
    figure = compare.plot_bits_per_dim(rows, ["fvae", "glow", "vae"])
    for axis in figure.axes:
        assert [line.get_label() for line in axis.get_lines()] == [
            "f-VAE: bound, importance-weighted, K = 16",
            "f-VAE: bound, importance-weighted, K = 16, at the fitted t_x",
            "Glow: exact",
            "VAE: bound, importance-weighted, K = 16",
            "VAE: bound, importance-weighted, K = 16, at the fitted t_x"]
    assert [t.get_text() for t in figure.axes[1].get_legend().get_texts()] == [
        line.get_label() for line in figure.axes[1].get_lines()]
    assert "importance-weighted bound with K posterior draws" in figure.texts[0].get_text()
    from matplotlib import pyplot
    pyplot.close(figure)


@pytest.mark.slow
def test_bad_data_folder_is_a_one_line_error(tmp_path):
    result = subprocess.run([sys.executable, os.path.join(ROOT, "compare.py"), "--data-dir",
                             str(tmp_path / "none")], capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and result.stderr.count("\n") == 1
    assert "--data-dir" in result.stderr
