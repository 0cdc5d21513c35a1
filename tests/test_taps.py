import dataclasses

import pytest
import torch
from torch import nn

from flowdistill.errors import TapError
from flowdistill.taps import FeatureTaps, module_paths


def test_sequential_taps_match_manual_forward():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 3))
    x = torch.randn(4, 5)
    out, feats = FeatureTaps(net, ["1", "logits"])(x)
    # oracle: the layers applied by hand
    hidden = torch.tanh(net[0](x))
    torch.testing.assert_close(feats["1"], hidden)
    torch.testing.assert_close(feats["logits"], net[2](hidden))
    torch.testing.assert_close(out, net[2](hidden))


def test_transformer_encoder_layer_paths_and_probe():
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(d_model=16, nhead=2, dim_feedforward=32, batch_first=True)
    enc = nn.TransformerEncoder(layer, num_layers=3, enable_nested_tensor=False)
    taps = FeatureTaps(enc, ["layers.1", "layers.2.linear1", "logits"])
    shapes = taps.probe(torch.randn(2, 5, 16))
    assert shapes == {"layers.1": (5, 16), "layers.2.linear1": (5, 32), "logits": (5, 16)}
    enc.eval()
    x = torch.randn(3, 5, 16)
    _, feats = taps(x)
    with torch.no_grad():
        manual = enc.layers[1](enc.layers[0](x))
    torch.testing.assert_close(feats["layers.1"], manual)


class TupleNet(nn.Module):
    """Returns (logits, embedding), like many detection/retrieval models."""

    def __init__(self):
        super().__init__()
        self.body = nn.Linear(6, 8)
        self.rnn = nn.GRU(8, 4, batch_first=True)
        self.head = nn.Linear(4, 3)

    def forward(self, x):
        h = self.body(x)  # (B, T, 8)
        seq, last = self.rnn(h)  # GRU returns a tuple
        return self.head(seq[:, -1]), seq


def test_tuple_outputs_first_tensor_and_index():
    torch.manual_seed(0)
    net = TupleNet()
    x = torch.randn(2, 4, 6)
    out, feats = FeatureTaps(net, ["rnn", "rnn[1]", "logits"])(x)
    seq, last = net.rnn(net.body(x))
    torch.testing.assert_close(feats["rnn"], seq)
    torch.testing.assert_close(feats["rnn[1]"], last)
    torch.testing.assert_close(feats["logits"], out[0])


def test_wrong_path_lists_closest_valid_paths():
    layer = nn.TransformerEncoderLayer(d_model=8, nhead=2, batch_first=True)
    enc = nn.TransformerEncoder(layer, num_layers=2, enable_nested_tensor=False)
    with pytest.raises(TapError) as err:
        FeatureTaps(enc, ["layer.1"])
    message = str(err.value)
    assert "'layer.1'" in message and "'layers.1'" in message


def test_wrong_index_and_unreached_tap():
    net = TupleNet()
    with pytest.raises(TapError, match="out of range"):
        FeatureTaps(net, ["rnn[5]"])(torch.randn(1, 2, 6))
    assert "body" in module_paths(net)


def test_probe_restores_training_mode_and_leaves_batchnorm_stats():
    net = nn.Sequential(nn.Conv2d(1, 2, 3), nn.BatchNorm2d(2))
    net.train()
    before = net[1].running_mean.clone()
    shapes = FeatureTaps(net, ["0"]).probe(torch.randn(2, 1, 6, 6) + 5)
    assert shapes["0"] == (2, 4, 4)
    assert net.training
    torch.testing.assert_close(net[1].running_mean, before)


def test_remove_detaches_hooks():
    net = nn.Sequential(nn.Linear(2, 2))
    taps = FeatureTaps(net, ["0"])
    assert len(net[0]._forward_hooks) == 1
    taps.remove()
    assert len(net[0]._forward_hooks) == 0


def test_a_deep_copied_distiller_reads_its_own_features():
    """The copy's hooks fill the copy's taps: its features are those of its own modules
    (after the copy's weights change, the original's features do not follow)."""
    import copy

    import flowdistill
    from flowdistill.models.small import SmallCNN

    torch.manual_seed(0)
    d = flowdistill.make_distiller(
        "fitnet", SmallCNN(1, 4, (8, 8, 16)), SmallCNN(1, 4, (4, 4, 8)),
        example_input=torch.randn(2, 1, 8, 8), student_taps=["stage2"], teacher_taps=["stage2"],
    )  # fmt: skip
    d.eval()
    twin = copy.deepcopy(d)
    with torch.no_grad():
        for p in twin.student.parameters():
            p.mul_(2.0)
    x = torch.randn(3, 1, 8, 8)
    mine, theirs = d.student_forward(x)["stage2"], twin.student_forward(x)["stage2"]
    assert torch.equal(theirs, twin.student.stage2(twin.student.stage1(x)))
    assert not torch.equal(mine, theirs)


def test_a_tap_changed_in_place_later_is_refused_at_probe():
    net = nn.Sequential(nn.Linear(4, 8), nn.ReLU(inplace=True), nn.Linear(8, 3))
    x = torch.randn(5, 4)
    x[0] = -10.0  # some pre-activations are negative, so the in-place ReLU changes them
    with pytest.raises(TapError, match=r"'0'.*changed in place.*ReLU\(inplace=True\)"):
        FeatureTaps(net, ["0"]).probe(x)
    assert FeatureTaps(net, ["1"]).probe(x) == {"1": (8,)}  # the module that changes it


def test_a_module_run_twice_per_forward_is_refused_at_probe():
    act = nn.Tanh()
    net = nn.Sequential(nn.Linear(4, 4), act, nn.Linear(4, 4), act)
    with pytest.raises(TapError, match=r"'1'.*runs 2 times"):
        FeatureTaps(net, ["1"]).probe(torch.randn(2, 4))


def test_hooks_go_with_their_taps_when_a_model_outlives_them():
    """A teacher reused for several distillers keeps no hook of a discarded one (which
    would hold its last activation and run on every forward pass)."""
    import gc

    import flowdistill

    teacher = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 3))
    for _ in range(3):
        student = nn.Sequential(nn.Linear(4, 2), nn.Tanh(), nn.Linear(2, 3))
        d = flowdistill.make_distiller(
            "fitnet", teacher, student, example_input=torch.randn(2, 4),
            student_taps=["1"], teacher_taps=["1"],
        )  # fmt: skip
        assert len(teacher[1]._forward_hooks) == 1
        del d
        gc.collect()
        assert len(teacher[1]._forward_hooks) == 0
    taps = FeatureTaps(teacher, ["1"])
    teacher(torch.randn(2, 4))  # the model run on its own: the taps keep nothing
    assert taps._store == {}


class FeaturesFirst(nn.Module):
    """Returns (features, logits), as models written for feature distillation often do."""

    def __init__(self, width=6, classes=3, as_dict=False):
        super().__init__()
        self.body, self.head, self.as_dict = nn.Linear(4, width), nn.Linear(width, classes), as_dict

    def forward(self, x):
        h = torch.relu(self.body(x))
        return {"feats": h, "out": self.head(h)} if self.as_dict else (h, self.head(h))


def test_the_logits_are_the_output_element_a_method_names():
    from flowdistill import OptimConfig, TrainConfig, fit, make_distiller
    from flowdistill.data import Split, Splits
    from flowdistill.errors import ShapeMismatchError

    torch.manual_seed(0)
    teacher, student = FeaturesFirst(12, as_dict=True), FeaturesFirst(6)
    x, y = torch.randn(48, 4), torch.randint(0, 3, (48,))
    data = Splits(Split(x[:32], y[:32]), Split(x[32:40], y[32:40]), Split(x[40:], y[40:]), 3)
    d = make_distiller("kd", teacher, student, example_input=x[:2],
                       student_output=1, teacher_output="out")  # fmt: skip
    assert d.student_shapes["logits"] == (3,) and d.teacher_shapes["logits"] == (3,)
    with torch.no_grad():  # the oracle: the heads applied by hand
        torch.testing.assert_close(d.predict(x[:5]), student(x[:5])[1])
        torch.testing.assert_close(d.teacher_forward(x[:5])["logits"], teacher(x[:5])["out"])
    fit(d, data, OptimConfig("sgd", lr=0.1), TrainConfig(epochs=1, progress=False))
    # by default the first tensor is taken: the features; the messages name the option
    with pytest.raises(ShapeMismatchError, match=r"name another with student_output=<index"):
        make_distiller("kd", teacher, student, example_input=x[:2], teacher_output="out")
    alone = make_distiller("student", None, student, example_input=x[:2])
    with pytest.raises(ShapeMismatchError, match="student_output / teacher_output"):
        fit(alone, data, OptimConfig("sgd"), TrainConfig(epochs=1, progress=False))


def test_a_wrong_output_selector_is_named():
    net, as_dict = FeaturesFirst(), FeaturesFirst(as_dict=True)
    with pytest.raises(TapError, match=r"no entry 'logits'; its entries: 'feats', 'out'"):
        FeatureTaps(as_dict, output="logits")(torch.zeros(2, 4))
    with pytest.raises(TapError, match="name its logits by key"):
        FeatureTaps(as_dict, output=0)(torch.zeros(2, 4))
    with pytest.raises(TapError, match="index \\[2\\] is out of range"):
        FeatureTaps(net, output=2)(torch.zeros(2, 4))
    with pytest.raises(TapError, match="an index into a tuple"):
        FeatureTaps(net, output=1.0)


def test_a_top_k_cache_takes_the_named_output():
    from flowdistill.distillers.cached import build_topk_cache

    torch.manual_seed(0)
    teacher, x = FeaturesFirst(as_dict=True), torch.randn(5, 4)
    cache = build_topk_cache(teacher, x, k=2, dtype="float32", output="out")
    with torch.no_grad():
        top = teacher(x)["out"].topk(2, dim=-1)
    torch.testing.assert_close(cache.values.float(), top.values)


def test_a_tap_that_is_not_a_string_is_named():
    net = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3))
    with pytest.raises(TapError, match=r"a module path \(a string\), got 2 of type int.*'2'"):
        FeatureTaps(net, [2])


def _fitnet_pair(inputs: int, wide: int, narrow: int, classes: int, act):
    """Two-layer MLP teacher (``wide``) and student (``narrow``), FitNet on their hidden
    activations (tap ``"1"``)."""
    import flowdistill

    torch.manual_seed(0)
    teacher = nn.Sequential(nn.Linear(inputs, wide), act(), nn.Linear(wide, classes))
    student = nn.Sequential(nn.Linear(inputs, narrow), act(), nn.Linear(narrow, classes))
    d = flowdistill.make_distiller(
        "fitnet", teacher, student, student_taps=["1"], teacher_taps=["1"],
        example_input=torch.randn(2, inputs),
    )  # fmt: skip
    return teacher, student, d


@pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:DeprecationWarning")
def test_a_model_saved_or_copied_while_its_distiller_lives_carries_no_hook(tmp_path):
    """``torch.save``/``pickle``/``copy.deepcopy`` of the user's own model work while its
    distiller lives; the loaded or copied model computes the same outputs, has no hooks
    (so TorchScript takes it) and writes nothing into the distiller, which still captures."""
    import copy
    import pickle

    teacher, student, d = _fitnet_pair(20, 32, 8, 5, nn.ReLU)
    x = torch.randn(4, 20)
    torch.save(student, tmp_path / "student.pt")
    loaded = torch.load(tmp_path / "student.pt", weights_only=False)
    copies = [loaded, pickle.loads(pickle.dumps(teacher)), copy.deepcopy(student)]
    for twin, original in zip(copies, [student, teacher, student], strict=True):
        assert all(not m._forward_hooks for m in twin.modules())
        with torch.no_grad():
            torch.testing.assert_close(twin(x), original(x))
        scripted = torch.jit.script(twin)
        with torch.no_grad():
            torch.testing.assert_close(scripted(x), original(x))
    # the distiller keeps its hooks and still reads the original models' features
    assert len(student[1]._forward_hooks) == 1 and len(teacher[1]._forward_hooks) == 1
    with torch.no_grad():
        torch.testing.assert_close(d.student_forward(x)["1"], torch.relu(student[0](x)))
        torch.testing.assert_close(d.teacher_forward(x)["1"], torch.relu(teacher[0](x)))
    # the documented way to script the model itself: detach the taps first
    d.student_taps.remove()
    torch.testing.assert_close(torch.jit.script(student)(x), student(x))


def test_a_distiller_saved_whole_comes_back_with_working_taps(tmp_path):
    teacher, student, d = _fitnet_pair(6, 8, 4, 3, nn.Tanh)
    torch.save(d, tmp_path / "distiller.pt")
    back = torch.load(tmp_path / "distiller.pt", weights_only=False)
    x = torch.randn(3, 6)
    with torch.no_grad():  # the loaded taps read the loaded models, not the originals
        back.student[0].weight.mul_(2.0)
        torch.testing.assert_close(back.student_forward(x)["1"], torch.tanh(back.student[0](x)))
        torch.testing.assert_close(back.teacher_forward(x)["1"], torch.tanh(back.teacher[0](x)))
        torch.testing.assert_close(d.student_forward(x)["1"], torch.tanh(student[0](x)))


@dataclasses.dataclass
class Out:
    feats: torch.Tensor
    out: torch.Tensor
    note: str = ""


@dataclasses.dataclass
class LogitsOut:
    logits: torch.Tensor
    hidden: torch.Tensor


class DataclassNet(nn.Module):
    def __init__(self, kind):
        super().__init__()
        self.body, self.head, self.kind = nn.Linear(4, 6), nn.Linear(6, 3), kind

    def forward(self, x):
        h = torch.relu(self.body(x))
        return self.kind(h, self.head(h)) if self.kind is Out else self.kind(self.head(h), h)


def test_a_dataclass_output_is_read_like_a_dict_of_its_fields():
    """As for a dict (or a Hugging Face ModelOutput): the ``logits`` field when there is
    one, else the first tensor field, or the field ``output`` names; an index is refused."""
    torch.manual_seed(0)
    x = torch.randn(5, 4)
    named, unnamed = DataclassNet(LogitsOut), DataclassNet(Out)
    with torch.no_grad():
        assert torch.equal(FeatureTaps(named)(x)[1]["logits"], named(x).logits)
        assert torch.equal(FeatureTaps(unnamed)(x)[1]["logits"], unnamed(x).feats)
        assert torch.equal(FeatureTaps(unnamed, output="out")(x)[1]["logits"], unnamed(x).out)
    with pytest.raises(TapError, match=r"by key \(one of 'feats', 'out', 'note'\)"):
        FeatureTaps(unnamed, output=1)(x)
    with pytest.raises(TapError, match=r"no entry 'logit'; its entries: 'feats', 'out', 'note'"):
        FeatureTaps(unnamed, output="logit")(x)


class Holder:
    """A model output that is neither a tensor, a sequence, a dict nor a dataclass."""

    def __init__(self, scores):
        self.scores, self.name = scores, "holder"


def test_an_output_with_no_tensor_found_names_the_output_option():
    net = nn.Sequential(nn.Linear(4, 3))
    net.register_forward_hook(lambda _m, _i, out: Holder(out))
    with pytest.raises(TapError, match=r"name its logits with output= .*teacher_output=.*'scores'"):
        FeatureTaps(net)(torch.zeros(2, 4))
    assert FeatureTaps(net, output="scores")(torch.zeros(2, 4))[1]["logits"].shape == (2, 3)


class ListNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.layers = nn.ModuleList([nn.Linear(4, 4), nn.Linear(4, 4)])
        self.heads = nn.ModuleDict({"a": nn.Linear(4, 2)})

    def forward(self, x):
        for layer in self.layers:
            x = torch.tanh(layer(x))
        return self.heads["a"](x)


def test_a_tap_on_a_container_names_the_paths_of_its_elements():
    net = ListNet()
    with pytest.raises(TapError, match=r"'layers' is a ModuleList, a container .* 'layers\.1'"):
        FeatureTaps(net, ["layers[1]"])
    with pytest.raises(TapError, match=r"'layers\.1'"):
        FeatureTaps(net, ["layers[-1]"])
    with pytest.raises(TapError, match=r"'heads' is a ModuleDict.*elements: 'heads\.a'"):
        FeatureTaps(net, ["heads"])
    x = torch.randn(2, 4)
    _, feats = FeatureTaps(net, ["layers.1"])(x)
    torch.testing.assert_close(feats["layers.1"], net.layers[1](torch.tanh(net.layers[0](x))))
