"""Every command on a run that takes --seed writes the same output twice with the same seed,
run twice on one loaded model (as in a notebook: nothing it draws may depend on what drew
before), on the f-VAE and the Glow run of tests/data/runs_before_redesign;
`interpolate --image-latent draw` (the author's noisy posterior z) is seeded too, and
refused, in one line, for Glow, which has no posterior, and between samples."""

import os
import shutil

import pytest

from conftest import ROOT
from test_same_weights import write_pictures
import f_vaes
import face_runs
import glow

FIXTURE = os.path.join(ROOT, "tests", "data", "runs_before_redesign")
MODELS = {"fvae16": f_vaes.FVAE_RUNS, "glow16": glow.GLOW_RUNS}

GRID = ["--rows", "2", "--cols", "3"]
COMMANDS = [  # (argv, the files it writes); `interpolate --between samples` draws as `sample`
    (["sample", "--temperatures", "0.7", *GRID], ["sample_T0.7.png"]),
    (["sweep", "--rows", "2", "--sweep", "0,0.5,1"], ["sweep.png"]),
    (["interpolate", *GRID], ["interpolate_2.png", "interpolate_4.png"]),
    (["evaluate"], ["evaluate.json"]),
]
FVAE_COMMANDS = [  # (Glow draws no noise in evaluation: its K draws are one)
    (["evaluate", "--samples", "2"], ["evaluate.json"]),
    (["reconstruct", *GRID], ["reconstruct.png", "reconstruct_pairs.png"]),
    (["interpolate", "--image-latent", "draw", *GRID], ["interpolate_2.png", "interpolate_4.png"]),
    (["encode", "--folder", "{base}/pictures", "--dest", "{base}/codes"],
     ["codes.npy", "codes.csv"]),
]


@pytest.fixture(scope="module", params=sorted(MODELS))
def run(request, tmp_path_factory):
    """(FaceModel, run folder, its config, its model loaded once) of a copy of a saved run,
    with its pictures beside it."""
    name = request.param
    base = tmp_path_factory.mktemp(name)
    shutil.copytree(os.path.join(FIXTURE, name), base / name)
    pictures = write_pictures(str(base / "pictures"), n=12, size=16)
    face_model = MODELS[name]
    config, model = face_runs.load_run(face_model, str(base / name), data_dir=pictures)
    return face_model, base / name, config, model


def outputs(run, argv, names, seed):
    """The bytes of the files `names` that the command `argv` writes with --seed `seed`."""
    face_model, folder, config, model = run
    argv = [a.replace("{base}", str(folder.parent)) for a in argv]
    args = face_runs.parse_args(face_model, argv + ["--out", str(folder), "--seed", str(seed)])
    face_runs.RUN_COMMANDS[args.command](args, config, model)
    return {name: (folder / name if os.path.exists(folder / name)
                   else folder.parent / name).read_bytes() for name in names}


def test_every_command_gives_the_same_output_twice_with_the_same_seed(run):
    face_model = run[0]
    commands = COMMANDS + (FVAE_COMMANDS if face_model.name == "fvae" else [])
    for argv, names in commands:
        first = outputs(run, argv, names, seed=7)
        assert outputs(run, argv, names, seed=7) == first, argv


def test_interpolation_between_noisy_posterior_draws_is_not_the_posterior_mean(run):
    if run[0].name != "fvae":
        pytest.skip("Glow has no posterior: refused in the next test")
    mean = outputs(run, ["interpolate", *GRID], ["interpolate_2.png"], seed=7)
    draw = outputs(run, ["interpolate", "--image-latent", "draw", *GRID], ["interpolate_2.png"],
                   seed=7)
    assert mean != draw


@pytest.mark.parametrize("argv, why", [
    (["--image-latent", "draw"], "no posterior"),
    (["--image-latent", "draw", "--between", "samples"], "--between images"),
])
@pytest.mark.slow
def test_a_posterior_draw_where_there_is_none_is_a_one_line_error(run, argv, why, capsys,
                                                                  tmp_path):
    face_model, folder = run[:2]
    if face_model.name == "fvae" and "samples" not in argv:
        pytest.skip("the f-VAE draws")
    shutil.copytree(os.path.join(FIXTURE, folder.name), tmp_path / "run")  # no pictures yet
    with pytest.raises(SystemExit) as exit_info:
        face_model.main(["interpolate", "--out", str(tmp_path / "run"), *argv,
                         "--data-dir", str(folder.parent / "pictures")])
    err = capsys.readouterr().err.strip()
    assert exit_info.value.code == 2 and len(err.splitlines()) == 1, err
    assert "--image-latent draw" in err and why in err, err
    assert not [name for name in os.listdir(tmp_path / "run") if name.startswith("interpolate")]
