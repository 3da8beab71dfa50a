"""The training noise and the data order draw from separate random keys (issue 35).

A model's noise (its `keras.random.SeedGenerator`, and Keras' global generator and
initialisers after `keras.utils.set_random_seed`) never takes a key that shuffles a pass of
the data (`datasets.order_key`). Runs saved before, whose pass k was shuffled with the key of
noise draw k, keep that key when they resume (`datasets.run_data_order`): they see the
batches they would have seen (tests/test_run_before_live_weights.py compares their next
losses with the old code's).
"""

import dataclasses
import gzip
import inspect
import json
import os
import shutil

import numpy as np
import pytest
import tensorflow as tf
import keras
from keras.src.backend.tensorflow.random import _cast_seed
from keras.src.random.seed_generator import draw_seed

from conftest import ROOT
from test_same_weights import write_pictures
from common import UsageError
import cli
import datasets
import f_vaes
import face_runs
import glow
import infomax
from training.checkpoint import check_run_config, weights_attrs

RUNS_BEFORE = os.path.join(ROOT, "tests", "data", "runs_before_redesign")
OLD_INFOMAX_RUN = os.path.join(ROOT, "tests", "data", "infomax_run_before_search_redesign")
DRAWS = 1000


def as_read(pairs):
    """Seed pairs as TensorFlow's stateless ops key on them: two 64-bit words (an int32 word
    sign-extended)."""
    return {tuple(int(word) for word in pair) for pair in np.asarray(pairs, np.int64)}


def noise_keys(seed, draws=DRAWS):
    """The seed pairs Keras hands TensorFlow for a model's noise: `draws` draws of a
    SeedGenerator(seed), then, after keras.utils.set_random_seed(seed), `draws` of the global
    generator and the first draws of `draws` initialisers, each cast as its backend casts it."""
    generator = keras.random.SeedGenerator(seed)
    pairs = [generator.next() for _ in range(draws)]
    keras.utils.set_random_seed(seed)
    pairs += [draw_seed(None) for _ in range(draws)]
    pairs += [draw_seed(keras.initializers.GlorotUniform().seed) for _ in range(draws)]
    return as_read(_cast_seed(tf.stack(pairs)).numpy())


def data_keys(seed, own_stream, passes=DRAWS):
    return as_read([datasets.order_key(seed, p, own_stream).numpy() for p in range(passes)])


@pytest.mark.parametrize("seed", [0, 3, 1234567])
def test_no_noise_draw_takes_a_key_of_the_data_order(seed):
    noise = noise_keys(seed)
    assert not data_keys(seed, own_stream=True) & noise
    assert data_keys(seed, own_stream=False) & noise  # the shared key of runs saved before


def test_keys_meet_where_tensorflow_draws_the_same_numbers():
    """The premise of the test above: noise draw k of SeedGenerator(seed) is TensorFlow's draw
    at the int64 pair [seed, k], the shared key of pass k, and not at the data order's own."""
    seed, generator = 3, keras.random.SeedGenerator(3)
    for k in range(3):
        noise = keras.random.uniform((16,), seed=generator).numpy()
        at = lambda key: tf.random.stateless_uniform((16,), seed=key).numpy()  # noqa: E731
        np.testing.assert_array_equal(noise, at(datasets.order_key(seed, k, own_stream=False)))
        assert not np.array_equal(noise, at(datasets.order_key(seed, k)))


def positions(dataset, n):
    return [int(i) for i in dataset.take(n)]


@pytest.mark.parametrize("start", [0, 5, 7, 16])
def test_the_shared_key_gives_the_order_of_runs_saved_before(start):
    """As the code before shuffled: pass p by stateless_shuffle at [seed, p]."""
    count, seed = 7, 5
    passes = [tf.random.experimental.stateless_shuffle(
        tf.range(count, dtype=tf.int64), seed=tf.constant([seed, p], tf.int64)).numpy()
        for p in range(5)]
    before = [int(i) for i in np.concatenate(passes)]
    shared = positions(datasets.stream_order(count, seed, start, own_stream=False), 14)
    assert shared == before[start:start + 14]
    assert positions(datasets.stream_order(count, seed, start), 14) != shared


@pytest.mark.parametrize("start", [3, 7, 10, 21])
def test_a_resumed_stream_reads_on_where_it_stopped(start):
    count, seed = 7, 5
    whole = positions(datasets.stream_order(count, seed), 35)
    assert positions(datasets.stream_order(count, seed, start), 35 - start) == whole[start:]
    assert sorted(whole[7:14]) == list(range(count))  # every pass a permutation


# --------------------------------------------------------------------------- which runs keep which

OLD_FACE_RUNS = {"fvae16": f_vaes.Config, "glow16": glow.Config}  # in RUNS_BEFORE


def resolved_face_config(config_class, saved, data_dir, out):
    """The config a face run trains with: its flags (here those it saved), the run folder's
    data order (`face_runs.resolve_run_data`)."""
    config = dataclasses.replace(cli.config_from_json(config_class, saved), data_dir=str(data_dir))
    return face_runs.resolve_run_data(config, str(out))


def save_face_config(config, out):
    """config.json as `training.run.prepare_run` checks and writes it."""
    return check_run_config(str(out), dataclasses.asdict(config), config.MODEL_KEYS,
                            getattr(config, "ADDED_KEYS", ()),
                            getattr(config, "ASSUMED_BEFORE", None))


def read_config(folder):
    with open(os.path.join(folder, "config.json")) as f:
        return json.load(f)


@pytest.mark.parametrize("name", sorted(OLD_FACE_RUNS))
def test_a_face_run_saved_before_resumes_with_the_shared_key(name, tmp_path):
    """Its config.json, as the code before wrote it, lacks the key: the resume check passes,
    the run keeps the shared key, and its config.json says so from then on."""
    out, config_class = tmp_path / name, OLD_FACE_RUNS[name]
    shutil.copytree(os.path.join(RUNS_BEFORE, name), out)
    saved = read_config(out)
    assert "data_order" not in saved
    config = resolved_face_config(config_class, saved, tmp_path, out)
    assert config.data_order == datasets.SHARED_SEED
    save_face_config(config, out)
    assert read_config(out)["data_order"] == datasets.SHARED_SEED
    assert resolved_face_config(config_class, saved, tmp_path, out).data_order == \
        datasets.SHARED_SEED


def test_a_new_face_run_writes_its_own_stream_and_keeps_it(tmp_path):
    out = tmp_path / "run"
    saved = read_config(os.path.join(RUNS_BEFORE, "fvae16"))  # its flags, in a new folder
    config = resolved_face_config(f_vaes.Config, saved, tmp_path, out)
    assert config.data_order == datasets.OWN_STREAM
    os.makedirs(out)
    save_face_config(config, out)
    assert read_config(out)["data_order"] == datasets.OWN_STREAM
    assert resolved_face_config(f_vaes.Config, saved, tmp_path, out).data_order == \
        datasets.OWN_STREAM
    parser = cli.ArgumentParser()
    cli.add_config_flags(parser, f_vaes.Config)
    assert "--data-order" not in parser._option_string_actions  # the run folder decides


def test_without_config_json_the_weights_tell_the_data_order(tmp_path):
    """The weights of a run saved before record no data order: the shared key."""
    shutil.copy(os.path.join(RUNS_BEFORE, "fvae16", "latest.weights.h5"), tmp_path)
    assert datasets.run_data_order(str(tmp_path)) == datasets.SHARED_SEED
    assert datasets.run_data_order(str(tmp_path / "new")) == datasets.OWN_STREAM


def test_a_data_order_edited_by_hand_is_a_one_line_error(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"data_order": "sorted"}))
    with pytest.raises(UsageError, match="config.json: key 'data_order' is 'sorted'"):
        datasets.run_data_order(str(tmp_path))


def save_infomax_config(config, out):
    return check_run_config(str(out), dataclasses.asdict(config), infomax.Config.MODEL_KEYS,
                            infomax.Config.ADDED_KEYS, infomax.Config.ASSUMED_BEFORE)


def infomax_config(saved, out):
    """The Config a resumed InfoMax run trains with (`infomax.train` resolves the data order)."""
    config = cli.config_from_json(infomax.Config, saved)
    return dataclasses.replace(config, data_order=datasets.run_data_order(str(out)))


def test_an_infomax_run_saved_before_resumes_with_the_shared_key(tmp_path):
    out = tmp_path / "run"
    os.makedirs(out)
    shutil.copy(os.path.join(OLD_INFOMAX_RUN, "config.json"), out)
    config = infomax_config(read_config(out), out)
    assert config.data_order == datasets.SHARED_SEED
    save_infomax_config(config, out)
    assert read_config(out)["data_order"] == datasets.SHARED_SEED


def test_a_new_infomax_run_writes_its_own_stream_and_never_resumes_into_the_shared_one(
        tmp_path):
    out = tmp_path / "run"
    config = infomax_config(read_config(OLD_INFOMAX_RUN), out)  # its flags, in a new folder
    assert config.data_order == datasets.OWN_STREAM
    os.makedirs(out)
    save_infomax_config(config, out)
    assert read_config(out)["data_order"] == datasets.OWN_STREAM
    assert infomax_config({}, out).data_order == datasets.OWN_STREAM
    with pytest.raises(UsageError, match="holds another model"):
        save_infomax_config(dataclasses.replace(config, data_order=datasets.SHARED_SEED), out)


# --------------------------------------------------------------------------- training on them

def streams_made(monkeypatch, module, name):
    """The `own_stream` of every training stream `module.name` makes from now on."""
    make, seen = getattr(module, name), []

    def recording(*args, **kwargs):
        bound = inspect.signature(make).bind(*args, **kwargs)
        bound.apply_defaults()
        seen.append(bound.arguments["own_stream"])
        return make(*args, **kwargs)
    monkeypatch.setattr(module, name, recording)
    return seen


def data_order_in_weights(run):
    return json.loads(weights_attrs(os.path.join(run, "latest.weights.h5"))["config"]).get(
        "data_order")


FACE_FLAGS = ["--img-size", "16", "--level", "2", "--depth", "1", "--coupling-width", "8",
              "--batch-size", "4", "--steps-per-epoch", "2", "--holdout", "2", "--seed", "3",
              "--data-dir", "pictures", "--log-every", "0"]  # those of RUNS_BEFORE's glow16


@pytest.mark.slow
def test_a_face_run_trains_on_the_stream_its_folder_names(tmp_path, monkeypatch):
    """A new run trains on its own stream and says so in config.json and in its weights; the
    Glow run saved before resumes on the shared key."""
    monkeypatch.chdir(tmp_path)
    shutil.copytree(os.path.join(RUNS_BEFORE, "glow16"), "glow16")
    write_pictures("pictures", n=12, size=16)
    own_streams = streams_made(monkeypatch, datasets, "image_stream")
    assert glow.main([*FACE_FLAGS, "--epochs", "1", "--out", "new"]) == 0
    assert glow.main([*FACE_FLAGS, "--epochs", "2", "--out", "glow16"]) == 0
    assert own_streams == [True, False]
    assert read_config("new")["data_order"] == data_order_in_weights("new") == datasets.OWN_STREAM
    assert read_config("glow16")["data_order"] == data_order_in_weights("glow16") == \
        datasets.SHARED_SEED


@pytest.mark.slow
def test_an_infomax_run_trains_on_the_stream_its_folder_names(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    shutil.copytree(OLD_INFOMAX_RUN, "old", ignore=shutil.ignore_patterns("index"))
    for name in ("latest", "best", "encoder"):
        with gzip.open(os.path.join("old", f"{name}.weights.h5.gz")) as packed, \
                open(os.path.join("old", f"{name}.weights.h5"), "wb") as unpacked:
            unpacked.write(packed.read())
    write_pictures("pictures", n=12, size=16)
    flags = ["--dataset", "folder", "--data-dir", "pictures", "--img-size", "16", "--z-dim",
             "8", "--batch-size", "4", "--steps-per-epoch", "2", "--monitor-knn", "0",
             "--no-baseline", "--probe-epochs", "1", "--seed", "5", "--no-jit",
             "--log-every", "0"]  # those the run saved before trained with
    own_streams = streams_made(monkeypatch, infomax, "training_stream")
    assert infomax.main([*flags, "--epochs", "1", "--out", "new"]) == 0
    assert infomax.main([*flags, "--epochs", "3", "--out", "old"]) == 0
    assert own_streams == [True, False]
    assert read_config("new")["data_order"] == data_order_in_weights("new") == datasets.OWN_STREAM
    assert read_config("old")["data_order"] == data_order_in_weights("old") == \
        datasets.SHARED_SEED
