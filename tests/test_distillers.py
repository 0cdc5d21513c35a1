"""Registry behaviour, and one training step of every registered method."""

import copy
import json
import warnings

import pytest
import torch

import flowdistill
from flowdistill.distillers import REGISTRY, VARIANTS, get_method, method_options
from flowdistill.errors import ConfigError, ShapeMismatchError, UnknownMethodError
from flowdistill.models.small import SmallCNN

#: every registered method and every variant (ablation) of one
ALL = sorted(REGISTRY) + sorted(VARIANTS)
FEATURE_TAPS = {"student_taps": ["stage2"], "teacher_taps": ["stage2"]}


def test_list_methods_has_the_foundation_methods():
    methods = flowdistill.list_methods()
    assert {"student", "kd"} <= set(methods)
    assert methods == sorted(methods)


def test_unknown_method_is_named_with_suggestions():
    with pytest.raises(UnknownMethodError) as err:
        flowdistill.make_distiller("kdd", None, torch.nn.Linear(2, 2))
    assert "'kdd'" in str(err.value) and "'kd'" in str(err.value)


def test_unknown_option_lists_valid_ones(pair):
    teacher, student, _ = pair
    with pytest.raises(ConfigError, match="temprature"):
        flowdistill.make_distiller("kd", teacher, student, temprature=2.0)
    assert "temperature" in method_options("kd")


def test_mismatched_classes_are_reported(pair):
    teacher, _, x = pair
    student = SmallCNN(1, 7, (4, 4, 8))
    with pytest.raises(ShapeMismatchError, match=r"\(7,\).*\(4,\)"):
        flowdistill.make_distiller("kd", teacher, student, example_input=x)


@pytest.mark.parametrize("name", ALL)
def test_every_method_trains_one_step(name, pair):
    teacher, student, x = pair
    options = FEATURE_TAPS if get_method(name).uses_feature_taps else {}
    distiller = flowdistill.make_distiller(name, teacher, student, example_input=x, **options)
    distiller.on_fit_start(16)
    distiller.on_fit_targets(torch.arange(16) % 4)
    distiller.batch_index = torch.tensor([3, 0, 7, 12])
    teacher_before = {k: v.clone() for k, v in teacher.state_dict().items()}
    distiller.train()
    if distiller.teacher is not None:
        assert not distiller.teacher.training
        assert not any(p.requires_grad for p in distiller.teacher.parameters())
    y = torch.tensor([0, 1, 2, 3])
    terms = distiller(x, y)
    assert "loss" in terms and len(terms) >= 2
    parts = sum(v for k, v in terms.items() if k != "loss")
    torch.testing.assert_close(terms["loss"], parts)
    assert torch.isfinite(terms["loss"])
    opt = torch.optim.SGD(distiller.trainable_parameters(), lr=0.1)
    before = [p.detach().clone() for p in student.parameters()]
    terms["loss"].backward()
    opt.step()
    assert any(not torch.equal(b, p) for b, p in zip(before, student.parameters(), strict=True))
    for k, v in teacher.state_dict().items():  # the teacher never changes, BN stats included
        torch.testing.assert_close(v, teacher_before[k])
    extra = sum(p.numel() for p in distiller.extra_parameters())
    assert distiller.num_extra_params() == extra
    assert distiller.predict(x).shape == (4, 4)


def test_kd_terms_follow_its_formula(pair):
    teacher, student, x = pair
    d = flowdistill.make_distiller(
        "kd", teacher, student, temperature=2.0, kd_weight=0.7, ce_weight=0.3
    )
    y = torch.tensor([0, 1, 2, 3])
    terms = d(x, y)
    with torch.no_grad():
        t, s = teacher.eval()(x), student(x)
    p_t = torch.softmax(t / 2, -1)
    kl = (p_t * (torch.log(p_t) - torch.log_softmax(s / 2, -1))).sum(-1).mean() * 4
    torch.testing.assert_close(terms["kd"].detach(), 0.7 * kl)
    ce = torch.nn.functional.cross_entropy(s, y)
    torch.testing.assert_close(terms["ce"].detach(), 0.3 * ce)


def test_distiller_in_a_users_own_loop(pair):
    """The API works without the engine: a plain loop lowers the loss."""
    teacher, student, x = pair
    d = flowdistill.make_distiller("kd", teacher, student)
    opt = torch.optim.Adam(d.trainable_parameters(), lr=1e-2)
    y = torch.tensor([0, 1, 2, 3])
    first = d(x, y)["loss"].item()
    for _ in range(30):
        loss = d(x, y)["loss"]
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert d(x, y)["loss"].item() < first


@pytest.mark.parametrize("name", ALL)
def test_every_method_fits_checkpoints_and_resumes(name, pair, tiny_data, tmp_path):
    """The engine drives every method: an epoch, a checkpoint, and a resume for more epochs
    than planned. The oracle is the run planned for 3 epochs from the start: the resumed
    run ends with its weights exactly, or, where the method's own schedule depends on the
    run's length (a ramp, a shortened warm-up), fit warns that it spliced the two plans and
    records it, and only then do the weights differ."""
    teacher, student, x = pair
    options = FEATURE_TAPS if get_method(name).uses_feature_taps else {}
    distiller = flowdistill.make_distiller(name, teacher, student, example_input=x, **options)
    fresh = copy.deepcopy(distiller)
    quiet = {"progress": False, "deterministic": True}
    optim = flowdistill.OptimConfig(lr=0.02, schedule="constant")  # (extends exactly)
    out = tmp_path / "run"
    first = flowdistill.fit(
        distiller, tiny_data, optim, flowdistill.TrainConfig(epochs=1, **quiet), out, batch_size=32
    )
    assert 0.0 <= first.test_acc_last <= 1.0 and first.extra_params == distiller.num_extra_params()
    torch.manual_seed(0)
    teacher2, student2 = SmallCNN(1, 4, (8, 8, 16)), SmallCNN(1, 4, (4, 4, 8))
    teacher2.load_state_dict(teacher.state_dict())
    again = flowdistill.make_distiller(name, teacher2, student2, example_input=x, **options)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        resumed = flowdistill.fit(
            again,
            tiny_data,
            optim,
            flowdistill.TrainConfig(epochs=3, **quiet),
            out,
            resume=True,
            batch_size=32,
        )
    assert len(resumed.history) == 3 and resumed.history[0] == first.history[0] | {
        k: resumed.history[0][k] for k in ("step_seconds", "samples_per_second")
    }
    said = [str(w.message) for w in caught if "spliced" in str(w.message)]
    record = json.loads((out / "result.json").read_text())
    flowdistill.fit(fresh, tiny_data, optim, flowdistill.TrainConfig(epochs=3, **quiet),
                    batch_size=32)  # fmt: skip
    ends = [(k, v, again.trainable_state_dict()[k])
            for k, v in fresh.trainable_state_dict().items()]  # fmt: skip
    same = all(torch.equal(v, w) for _, v, w in ends)
    if same:
        assert not said and "schedule_extended" not in record
    else:
        assert len(said) == 1 and f"{again.name}'s own schedule" in said[0], [
            k for k, v, w in ends if not torch.equal(v, w)
        ]
        (entry,) = record["schedule_extended"]
        assert entry["spliced"][0].startswith(f"{again.name}'s own schedule (")


def test_variants_preset_options_and_explicit_options_win(pair):
    teacher, student, x = pair
    assert method_options("flowdistill-noinv")["flow"] is False
    assert method_options("flowdistill")["flow"] is True
    d = flowdistill.make_distiller("flowdistill-noinv", teacher, student, example_input=x)
    assert type(d) is get_method("flowdistill") and not d.use_flow and len(d.velocities) == 0
    d = flowdistill.make_distiller(
        "flowdistill-noinv", teacher, student, example_input=x, flow=True
    )
    assert d.use_flow
    with pytest.raises(UnknownMethodError, match="flowdistill-noinv"):
        flowdistill.make_distiller("flowdistill-noin", teacher, student)


@pytest.mark.parametrize("name", [n for n in ALL if not get_method(n).uses_feature_taps])
def test_a_method_without_feature_taps_refuses_them(name, pair):
    """Taps a method would ignore are an error, not a silent no-op."""
    teacher, student, x = pair
    with pytest.raises(ConfigError, match=rf"{name!r} does not distil features.*'stage2'"):
        flowdistill.make_distiller(name, teacher, student, example_input=x, **FEATURE_TAPS)


def test_fm_kt_names_its_own_feature_option(pair):
    teacher, student, x = pair
    with pytest.raises(ConfigError, match="tap=<student module>"):
        flowdistill.make_distiller("fmkt", teacher, student, example_input=x, **FEATURE_TAPS)
    d = flowdistill.make_distiller("fmkt", teacher, student, example_input=x, tap="stage2")
    assert d.student_shapes["stage2"][0] == 4  # the tapped stage, 4 channels


def test_teacher_and_student_sharing_parameters_are_refused(pair):
    teacher, _, _ = pair
    with pytest.raises(ConfigError, match="share the same module"):
        flowdistill.make_distiller("kd", teacher, teacher)
    student = SmallCNN(1, 4, (4, 4, 8))
    student.stage1 = teacher.stage1  # a shared trunk would be frozen with the teacher
    with pytest.raises(ConfigError, match=r"share \d+ parameters \(stage1\."):
        flowdistill.make_distiller("kd", teacher, student)
    assert all(p.requires_grad for p in student.parameters())


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
@pytest.mark.parametrize("name", ALL)
def test_every_method_trains_a_pair_in_its_dtype(name, dtype):
    """A float64 pair trains in float64; a bf16 pair (weights in bf16, no autocast) trains
    too, its losses taken in float32 or wider, and predicts in bf16."""
    torch.manual_seed(0)
    teacher, student = SmallCNN(1, 4, (8, 8, 16)), SmallCNN(1, 4, (4, 4, 8))
    teacher, student = teacher.to(dtype), student.to(dtype)
    x = torch.randn(4, 1, 8, 8, dtype=dtype)
    options = FEATURE_TAPS if get_method(name).uses_feature_taps else {}
    d = flowdistill.make_distiller(name, teacher, student, example_input=x, **options)
    d.on_fit_start(16)
    d.on_fit_targets(torch.arange(16) % 4)
    d.batch_index = torch.tensor([3, 0, 7, 12])
    d.train()
    terms = d(x, torch.tensor([0, 1, 2, 3]))
    assert terms["loss"].dtype == torch.promote_types(dtype, torch.float32)
    assert torch.isfinite(terms["loss"])
    terms["loss"].backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in student.parameters())
    assert d.eval().predict(x).dtype == dtype


@pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:DeprecationWarning")
@pytest.mark.parametrize("name", ALL)
def test_every_method_leaves_the_users_models_saveable(name, pair, tmp_path):
    """While a distiller lives, the user's own student and teacher save whole, copy and
    pickle; the copies carry none of its hooks (so TorchScript takes them) and compute what
    the originals do."""
    import copy
    import pickle

    teacher, student, x = pair
    options = FEATURE_TAPS if get_method(name).uses_feature_taps else {}
    d = flowdistill.make_distiller(name, teacher, student, example_input=x, **options)
    models = [m for m in (student, d.teacher) if m is not None]
    for model in models:
        torch.save(model, tmp_path / "model.pt")
        copies = [torch.load(tmp_path / "model.pt", weights_only=False),
                  pickle.loads(pickle.dumps(model)), copy.deepcopy(model)]  # fmt: skip
        for twin in copies:
            assert not any(m._forward_hooks or m._forward_pre_hooks for m in twin.modules())
            with torch.no_grad():
                torch.testing.assert_close(twin.eval()(x), model.eval()(x))
    if name == "nd":  # (its hook sits on the classifier's input, not a tap's output)
        scripted = torch.jit.script(copy.deepcopy(student))
        with torch.no_grad():
            torch.testing.assert_close(scripted(x), student(x))
    d.on_fit_start(16)
    d.on_fit_targets(torch.arange(16) % 4)
    d.batch_index = torch.tensor([3, 0, 7, 12])
    d.train()
    assert d(x, torch.tensor([0, 1, 2, 3]))["loss"].isfinite()  # the distiller still works


def test_a_method_that_cannot_be_built_says_so_with_its_options(pair):
    teacher, student, _ = pair
    rgb = torch.randn(2, 3, 8, 8)  # the pair reads one channel
    with pytest.raises(ConfigError, match=r"'fitnet' could not be built.*channels.*\(2, 3, 8, 8\)"):
        flowdistill.make_distiller("fitnet", teacher, student, example_input=rgb, **FEATURE_TAPS)


@pytest.mark.parametrize("name", ALL)
def test_every_float_option_refuses_nan_and_infinity(name, pair):
    """A NaN or infinite weight, temperature or rate is named when the method is built,
    not met as a non-finite loss at the first step."""
    teacher, student, x = pair
    preset = flowdistill.distillers.registry.resolve(name)[1]  # a variant's fixed options
    floats = [k for k, v in method_options(name).items()
              if isinstance(v, float) and k not in preset]  # fmt: skip
    assert floats, f"{name} has no float option"
    for key in floats:
        for bad in (float("nan"), float("inf")):
            with pytest.raises(ConfigError, match=rf"{key} must be a finite number"):
                flowdistill.make_distiller(name, teacher, student, example_input=x, **{key: bad})
