import pytest

from flowdistill.config import OptimConfig, RunConfig, apply_overrides, load_config
from flowdistill.errors import ConfigError, UnknownMethodError


def test_defaults_and_yaml_file(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("method: kd\nmethod_options: {temperature: 2}\noptim:\n  lr: 0.1\n")
    cfg = load_config(path, ["train.epochs=3", "optim.milestones=[1, 2]"])
    assert isinstance(cfg, RunConfig)
    assert cfg.optim.lr == 0.1 and cfg.optim.milestones == [1, 2]
    assert cfg.train.epochs == 3 and cfg.method_options == {"temperature": 2}
    assert cfg.optim.name == OptimConfig().name


def test_unknown_key_suggests_the_right_one():
    with pytest.raises(ConfigError, match=r"unknown key 'optim.lrr' \(did you mean 'optim.lr'\?\)"):
        load_config({"optim": {"lrr": 0.1}})


@pytest.mark.parametrize(
    "override,message",
    [
        ("optim.lr=-1", "optim.lr must be positive"),
        ("optim.lr=fast", "'optim.lr' must be a number"),
        ("train.epochs=2.5", "'train.epochs' must be an integer"),
        ("optim.schedule=linear", "optim.schedule must be"),
        ("data.batch_size=0", "data.batch_size must be >= 1"),
        ("train.deterministic=maybe", "'train.deterministic' must be true or false"),
        ("data.name=npz", "data.path is required"),
        ("data.val_fraction=1.5", "data.val_fraction must be in"),
        ("optim", "not of the form key=value"),
    ],
)
def test_invalid_values_are_named(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, [override])


def test_unknown_method_in_config():
    with pytest.raises(UnknownMethodError, match="registered methods"):
        load_config({"method": "nope"})


def test_missing_and_malformed_files(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "absent.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("optim: [1, 2\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)
    scalar = tmp_path / "scalar.yaml"
    scalar.write_text("3\n")
    with pytest.raises(ConfigError, match="mapping"):
        load_config(scalar)


def test_overrides_create_nested_keys():
    assert apply_overrides({}, ["a.b.c=1", "a.d=x"]) == {"a": {"b": {"c": 1}, "d": "x"}}
