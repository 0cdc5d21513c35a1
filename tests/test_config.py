import pytest

from flowdistill.config import OptimConfig, RunConfig, apply_overrides, load_config
from flowdistill.errors import ConfigError, UnknownMethodError


def test_defaults_and_yaml_file(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("method: kd\nmethod_options: {temperature: 2}\noptim:\n  lr: 0.1\n")
    cfg = load_config(path, ["train.epochs=3", "optim.schedule=step", "optim.milestones=[1, 2]"])
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
        ("optim.momentum=1.5", r"optim.momentum must be in \[0, 1\), got 1.5"),
        ("optim.weight_decay=-1", "optim.weight_decay must be >= 0, got -1"),
        ("optim.milestones=[3]", "are for schedule 'step'; the 'cosine' schedule would ignore"),
        ("optim.milestones=[0]", "optim.milestones must be epochs >= 1"),
        ("data.split_seed=-1", "data.split_seed must be >= 0, got -1"),
        ("data.name=text", "data.path is required when data.name is 'text'"),
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


def test_numbers_in_exponent_form_and_device_names():
    """YAML 1.1 reads 1e-3 (no dot) as a string: a float field takes it as the number."""
    assert load_config(None, ["optim.lr=1e-3"]).optim.lr == pytest.approx(1e-3)
    assert load_config({"optim": {"weight_decay": "5e-4"}}).optim.weight_decay == 5e-4
    with pytest.raises(ConfigError, match="optim.lr must be positive and finite"):
        load_config(None, ["optim.lr=.inf"])
    assert load_config(None, ["train.device=cuda:1"]).train.device == "cuda:1"
    for bad in ("cpux", "cuda:abc"):
        with pytest.raises(ConfigError, match="train.device must be"):
            load_config(None, [f"train.device={bad}"])


def test_a_config_that_is_not_utf8_or_is_a_folder(tmp_path):
    latin = tmp_path / "latin.yaml"
    latin.write_bytes("method: kd # café\n".encode("latin-1"))
    with pytest.raises(ConfigError, match="is not UTF-8 text"):
        load_config(latin)
    with pytest.raises(ConfigError, match="is a directory"):
        load_config(tmp_path)
    toml = tmp_path / "run.toml"
    toml.write_text('method = "kd"\n')
    with pytest.raises(ConfigError, match=r"configs are YAML \(or JSON\), not toml"):
        load_config(toml)


def test_method_options_are_checked_against_their_types():
    import flowdistill
    from flowdistill.models.small import SmallCNN

    teacher, student = SmallCNN(1, 4, (8, 8, 16)), SmallCNN(1, 4, (4, 4, 8))
    with pytest.raises(ConfigError, match="'kd.temperature' must be a number, got 'abc'"):
        flowdistill.make_distiller("kd", teacher, student, temperature="abc")
    assert flowdistill.make_distiller("kd", teacher, student, temperature="5e-1").temperature == 0.5
    with pytest.raises(ConfigError, match="'dkd.warmup_epochs'"):
        flowdistill.make_distiller("dkd", teacher, student, warmup_epochs=[1])


def test_a_step_schedule_needs_milestones_and_options_get_a_did_you_mean():
    import flowdistill
    from flowdistill.models.small import SmallCNN

    with pytest.raises(ConfigError, match="needs optim.milestones"):
        load_config(None, ["optim.schedule=step"])
    teacher, student = SmallCNN(1, 4, (8, 8, 16)), SmallCNN(1, 4, (4, 4, 8))
    with pytest.raises(ConfigError, match="did you mean 'temperature'") as err:
        flowdistill.make_distiller("kd", teacher, student, tempreature=2.0)
    assert "example_input" not in str(err.value)


def test_a_model_section_without_a_name_is_refused():
    with pytest.raises(ConfigError, match="teacher.name is required"):
        load_config({"teacher": {"checkpoint": "runs/t/best.safetensors"}})
    assert load_config({}).student.name == "digits_student"  # the default student stays


def test_config_dataclasses_name_an_unknown_keyword():
    from flowdistill.config import OptimConfig, TrainConfig
    from flowdistill.errors import ConfigError

    with pytest.raises(
        ConfigError, match=r"TrainConfig has no field 'epoch' \(did you mean 'epochs'"
    ):
        TrainConfig(epoch=1)
    with pytest.raises(ConfigError, match=r"OptimConfig has no field 'lrr' \(did you mean 'lr'"):
        OptimConfig(lrr=1)
    assert TrainConfig(epochs=3).epochs == 3 and OptimConfig("adamw").name == "adamw"
