"""The experiment spec: defaults, overrides, and one-line errors naming the key."""

import pytest

from scoretrain.run import config
from scoretrain.errors import ConfigError

ROOT = __import__("pathlib").Path(__file__).resolve().parent.parent


def load(overrides, path=None):
    return config.load(path, overrides)


def error_of(overrides, path=None) -> str:
    with pytest.raises(ConfigError) as e:
        load(overrides, path)
    message = str(e.value)
    assert "\n" not in message
    return message


def test_shipped_configs_resolve_to_the_documented_recipe():
    fc = config.load(ROOT / "configs/mnist_fc.yaml")
    assert (fc.model.method, fc.model.widths, fc.model.k, fc.model.init) == ("edge-popup", [784, 250, 250, 10], 0.5, "signed_constant")
    assert (fc.train.optimizer, fc.train.lr, fc.train.momentum, fc.train.schedule, fc.train.weight_decay) == ("sgd", 0.1, 0.9, "cosine", 5e-4)
    assert (fc.train.batch_size, fc.train.epochs) == (128, 20)
    dense = config.load(ROOT / "configs/mnist_dense.yaml")
    assert (dense.model.method, dense.model.widths) == ("dense", [784, 100, 100, 10])


def test_overrides_are_parsed_as_yaml():
    cfg = load(["model.k=0.3", "model.widths=[784,500,10]", "train.nesterov=true", "train.weight_decay=1e-4", "seed=5"])
    assert cfg.model.k == 0.3 and cfg.model.widths == [784, 500, 10]
    assert cfg.train.nesterov is True and cfg.train.weight_decay == 1e-4 and cfg.seed == 5


def test_resolved_spec_round_trips_through_yaml(tmp_path):
    cfg = load(["model.k=0.7", "train.optimizer=adam"])
    path = tmp_path / "c.yaml"
    path.write_text(config.dump(cfg))
    assert config.load(path) == cfg


@pytest.mark.parametrize(
    "override,expected",
    [
        ("model.kk=0.3", "model.kk: unknown key (did you mean 'model.k'?)"),
        ("trian.lr=0.1", "trian: unknown key (did you mean 'train'?)"),
        ("model.k=1.5", "model.k: expected a fraction in (0, 1], got 1.5"),
        ("model.k=0", "model.k: expected a fraction in (0, 1], got 0.0"),
        ("model.k=high", "model.k: expected a number, got 'high'"),
        ("train.lr=-0.1", "train.lr: expected a positive number, got -0.1"),
        ("train.epochs=0", "train.epochs: expected a positive integer, got 0"),
        ("train.epochs=2.5", "train.epochs: expected an integer, got 2.5"),
        ("train.batch_size=-1", "train.batch_size: expected a positive integer, got -1"),
        ("model.widths=[100,250,10]", "model.widths[0]: expected 784 (the inputs of mnist), got 100"),
        ("model.widths=[784,250,9]", "model.widths[-1]: expected 10 (the classes of mnist), got 9"),
        ("model.widths=[784,a,10]", "model.widths[1]: expected an integer, got 'a'"),
        ("model.method=lottery", "model.method: expected one of edge-popup, dense, supermask, biprop, iterand, got 'lottery'"),
        ("model.arch=resnet", "model.arch: expected one of mlp, lenet, conv2, conv4, conv6, conv8, resnet20, resnet32, resnet56, resnet18, wrn28, custom, or resnetN (N = 6n + 2: 8, 14, 20, ...), wrnN (N = 6n + 4: 10, 16, 22, 28, ...), got 'resnet'"),
        ("model.k_scope=net", "model.k_scope: expected one of layer, global, got 'net'"),
        ("train.schedule=linear", "train.schedule: expected one of cosine, constant, step, got 'linear'"),
        ("device=tpu", "device: expected auto, cpu, gpu or gpu:N, got 'tpu'"),
        ("train.nesterov=3", "train.nesterov: expected true or false, got 3"),
        ("data.train_samples=0", "data.train_samples: expected a positive integer or null, got 0"),
    ],
)
def test_bad_values_name_the_key_and_the_expectation(override, expected):
    assert error_of([override]) == expected


def test_override_without_equals_is_refused():
    assert error_of(["model.k"]) == "override 'model.k': expected key=value, e.g. model.k=0.3"


def test_override_into_a_value_is_refused(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("seed: 3\n")
    assert error_of(["seed.x=1"], path) == "override 'seed.x=1': seed is not a section"


def test_errors_name_the_file(tmp_path):
    path = tmp_path / "exp.yaml"
    path.write_text("model:\n  k: 2\n")
    assert error_of([], path) == f"{path}: model.k: expected a fraction in (0, 1], got 2.0"


def test_yaml_syntax_error_gives_the_line(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("model:\n  k: 0.5\n  widths: [784, 10\ntrain:\n  lr: 0.1\n")
    message = error_of([], path)
    assert message.startswith(f"{path}:4:") and "YAML syntax error" in message


def test_missing_and_non_mapping_files(tmp_path):
    assert error_of([], tmp_path / "nope.yaml") == f"{tmp_path / 'nope.yaml'}: config file not found"
    path = tmp_path / "list.yaml"
    path.write_text("- 1\n- 2\n")
    assert "expected a mapping of sections" in error_of([], path)
    section = tmp_path / "section.yaml"
    section.write_text("model: 3\n")
    assert "model: expected a mapping of keys, got 3" in error_of([], section)


@pytest.mark.parametrize("path", sorted((ROOT / "configs").glob("*.yaml")), ids=lambda p: p.name)
def test_every_shipped_config_is_a_valid_spec(path):
    config.load(path)


def test_the_low_density_config_keeps_10036_of_266200_weights(tmp_path):
    from typer.testing import CliRunner

    from scoretrain.run import store
    from scoretrain.cli import app

    args = ["data.train_samples=500", "data.test_samples=200", "train.epochs=1", "model.k_warmup_epochs=0", "device=cpu"]
    result = CliRunner().invoke(app, ["fit", str(ROOT / "configs/mnist_low_density.yaml"), *args, "--runs-dir", str(tmp_path), "--name", "d", "-q"])
    assert result.exit_code == 0, result.output
    run = store.load(tmp_path / "d")
    assert sum(w.size for w in run.weights) == 266_200 and sum(int(m.sum()) for m in run.masks) == 10_036
