"""What may differ between the models of one batch: the structure check, the structure key,
per-submodule train/eval modes and per-model settings through extract/insert/drop."""

from __future__ import annotations

import copy
import itertools
from collections.abc import Callable
from typing import ClassVar

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import modelbatch
from modelbatch import ArchitectureMismatchError, ModelBatch
from modelbatch._structure import (
    check_per_model_settings,
    check_same_structure,
    model_settings,
    structure_key,
)
from tests.helpers import assert_close_models, train_alone


def net(
    stride: int = 1,
    p: float = 0.1,
    eps: float = 1e-5,
    slope: float = 0.01,
    bn: bool = False,
    padding_mode: str = "zeros",
) -> nn.Module:
    layers: list[nn.Module] = [nn.Conv1d(2, 4, 3, stride=stride, padding_mode=padding_mode)]
    if bn:
        layers.append(nn.BatchNorm1d(4))
    layers += [
        nn.LeakyReLU(slope),
        nn.Flatten(),
        nn.Linear(4 * (6 if stride == 1 else 3), 5),  # input length 8
        nn.LayerNorm(5, eps=eps),
        nn.Dropout(p),
        nn.Linear(5, 2),
    ]
    return nn.Sequential(*layers).double()


# ------------------------------------------------------------------ refused differences
@pytest.mark.parametrize(
    ("other", "pattern"),
    [
        (
            lambda: nn.Sequential(nn.Conv1d(2, 4, 3, stride=2)),
            r"model 1 differs from model 0 in submodule '0' \(Conv1d\): attribute 'stride' "
            r"is \(2,\) where model 0 has \(1,\)",
        ),
        (
            lambda: nn.Sequential(nn.Conv1d(2, 4, 3, padding=1)),
            r"submodule '0' \(Conv1d\): attribute 'padding' is \(1,\) where model 0 has \(0,\)",
        ),
        (
            lambda: nn.Sequential(nn.Conv1d(2, 4, 3, padding_mode="reflect")),
            r"attribute 'padding_mode' is 'reflect' where model 0 has 'zeros'",
        ),
    ],
)
def test_a_plain_attribute_difference_names_model_submodule_attribute_and_values(
    other: Callable[[], nn.Module], pattern: str
) -> None:
    with pytest.raises(ArchitectureMismatchError, match=pattern):
        ModelBatch([nn.Sequential(nn.Conv1d(2, 4, 3)), other()])


def test_the_error_says_what_may_differ_and_names_ids() -> None:
    with pytest.raises(ArchitectureMismatchError) as info:
        ModelBatch([net(), net(), net(padding_mode="circular")], model_ids=["a", "b", "c"])
    message = str(info.value)
    assert "model 2 (id 'c') differs from model 0" in message
    assert "Only these settings may differ" in message and "dropout p" in message


class Act(nn.Module):
    def __init__(self, fn: Callable[[torch.Tensor], torch.Tensor], scale: torch.Tensor) -> None:
        super().__init__()
        self.fn = fn
        self.scale = scale  # a plain tensor attribute: not stacked, compared by value

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fn(x) * self.scale


def test_functions_and_constant_tensors_are_compared() -> None:
    one = torch.ones(())
    ModelBatch([Act(F.relu, one), Act(F.relu, one.clone())])  # equal values: fine
    with pytest.raises(
        ArchitectureMismatchError, match=r"attribute 'fn' is <built-in function gelu"
    ):
        ModelBatch([Act(F.relu, one), Act(F.gelu, one)])
    with pytest.raises(ArchitectureMismatchError, match=r"attribute 'scale' is tensor\(2\.\)"):
        ModelBatch([Act(F.relu, one), Act(F.relu, one * 2)])


def test_hooks_are_compared() -> None:
    def double(m: nn.Module, i: object, o: torch.Tensor) -> torch.Tensor:
        return o * 2

    a, b = nn.Linear(2, 2), nn.Linear(2, 2)
    b.register_forward_hook(double)
    with pytest.raises(
        ArchitectureMismatchError, match=r"hooks _forward_hooks is \['<function .*double"
    ):
        ModelBatch([a, b])
    a.register_forward_hook(double)  # the same hook on both: fine
    ModelBatch([a, b])
    b.register_forward_hook(lambda m, i, o: o)
    a.register_forward_hook(lambda m, i, o: o * 3)  # other code: refused
    with pytest.raises(ArchitectureMismatchError, match=r"hooks _forward_hooks"):
        ModelBatch([a, b])


class Tagged(nn.Module):
    """Keeps its setting outside ``__dict__``: only ``extra_repr()`` shows it."""

    _tags: ClassVar[dict[int, str]] = {}

    def __init__(self, tag: str) -> None:
        super().__init__()
        Tagged._tags[id(self)] = tag

    def extra_repr(self) -> str:
        return f"tag={Tagged._tags[id(self)]}"


def test_extra_repr_is_compared() -> None:
    with pytest.raises(
        ArchitectureMismatchError, match=r"extra_repr\(\) is 'tag=y' where model 0 has 'tag=x'"
    ):
        ModelBatch([Tagged("x"), Tagged("y")])


def test_different_train_eval_modes_are_refused() -> None:
    a, b = net(bn=True), net(bn=True)
    b[1].eval()
    with pytest.raises(
        ArchitectureMismatchError,
        match=r"model 1 differs from model 0 in submodule '1' \(BatchNorm1d\): it is in eval "
        r"mode where model 0's is in training mode",
    ):
        ModelBatch([a, b])
    b.eval()
    with pytest.raises(ArchitectureMismatchError, match=r"submodule '<root>' \(Sequential\)"):
        ModelBatch([a, b])


def test_a_per_model_setting_without_a_per_model_layer_is_refused() -> None:
    """The contract with the layers: a setting that differs must be recorded as
    ``per_model_<attr>`` by the layer that runs it, or the batch is refused."""
    ms = [nn.Sequential(nn.Dropout(0.1)), nn.Sequential(nn.Dropout(0.3))]
    settings = [model_settings(m) for m in ms]
    assert settings == [{"0": {"p": 0.1}}, {"0": {"p": 0.3}}]
    with pytest.raises(
        ArchitectureMismatchError,
        match=r"model 1 differs from model 0 in submodule '0' \(Dropout\): attribute 'p' is "
        r"0\.3 where model 0 has 0\.1, and this batch has no per-model p for that layer",
    ):
        check_per_model_settings(copy.deepcopy(ms[0]), settings)
    check_per_model_settings(ModelBatch(ms).stacked, settings)  # PerModelDropout records them


# ------------------------------------------------------------------ structure_key
def test_structure_key_equal_iff_the_models_can_share_a_batch() -> None:
    variants: dict[str, Callable[[], nn.Module]] = {
        "base": net,
        "other weights": lambda: net().apply(
            lambda m: [p.data.normal_() for p in m.parameters(recurse=False)] and None
        ),
        "dropout": lambda: net(p=0.5),
        "eps": lambda: net(eps=1e-3),
        "slope": lambda: net(slope=0.2),
        "stride": lambda: net(stride=2),
        "float32": lambda: net().float(),
        "bn": lambda: net(bn=True),
        "eval": lambda: net().eval(),
        "frozen": lambda: net().requires_grad_(False),
    }
    built = {k: f() for k, f in variants.items()}
    keys = {k: structure_key(m) for k, m in built.items()}
    assert all(isinstance(hash(k), int) for k in keys.values())
    batchable = {"base", "other weights", "dropout", "eps", "slope"}
    for a, b in itertools.combinations(built, 2):
        try:
            check_same_structure([built[a], built[b]])
            ok = True
        except ArchitectureMismatchError:
            ok = False
        assert ok == (keys[a] == keys[b]) == ({a, b} <= batchable), (a, b)


def test_structure_key_of_library_architectures_is_stable() -> None:
    def transformer() -> nn.Module:
        layer = nn.TransformerEncoderLayer(8, 2, 16, dropout=0.0, batch_first=True)
        return nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)

    for make in (transformer, lambda: nn.LSTM(4, 8, 2, bidirectional=True), lambda: nn.GRU(3, 5)):
        a, b = make(), make()
        assert structure_key(a) == structure_key(b)
        check_same_structure([a, b])
    with pytest.raises(TypeError, match=r"takes a torch\.nn\.Module"):
        structure_key("model")  # type: ignore[arg-type]


# ------------------------------------------------------------------ train/eval modes
def finetune_model() -> nn.Module:
    m = nn.Sequential(
        nn.Linear(4, 6), nn.BatchNorm1d(6), nn.ReLU(), nn.Linear(6, 6), nn.BatchNorm1d(6),
        nn.Linear(6, 3)
    ).double()  # fmt: skip
    with torch.no_grad():
        for bn in (m[1], m[4]):
            bn.running_mean.uniform_(-1, 1)
            bn.running_var.uniform_(0.5, 2)
    m.train()
    m[1].eval()  # a frozen BatchNorm, as in fine-tuning
    return m


def test_frozen_batchnorm_in_eval_trains_like_alone() -> None:
    torch.manual_seed(0)
    models = [finetune_model() for _ in range(3)]
    data = [(torch.randn(8, 4, dtype=torch.float64), torch.randint(0, 3, (8,))) for _ in range(4)]
    alone = train_alone(
        models, lambda i, m: torch.optim.SGD(m.parameters(), lr=0.1 * (i + 1)), data,
        F.cross_entropy,
    )  # fmt: skip
    batch = ModelBatch(models)
    assert batch.training and not batch.stacked[1].training and batch.stacked[4].training
    opt = modelbatch.optim.SGD(batch, lr=[0.1, 0.2, 0.3])
    for x, y in data:
        opt.zero_grad()
        batch.compute_loss(batch(x), y, F.cross_entropy).backward()
        opt.step()
    extracted = batch.extract_all()
    assert_close_models(extracted, alone, torch.float64)
    for m in extracted:
        assert m.training and not m[1].training and m[4].training
    # Frozen statistics did not move; the trained BatchNorm's did.
    assert torch.equal(batch.stacked[1].running_mean[0], models[0][1].running_mean)
    assert not torch.equal(batch.stacked[4].running_mean[0], models[0][4].running_mean)
    # batch.train()/.eval() set every submodule, as model.train()/.eval() do.
    batch.eval()
    assert not any(m.training for m in batch.extract(0).modules())
    batch.train()
    assert all(m.training for m in batch.extract(0).modules())


# ------------------------------------------------------------------ per-model settings
def test_extract_returns_each_models_own_settings_across_drop() -> None:
    settings = [(0.1, 1e-5, 0.01), (0.2, 1e-3, 0.1), (0.3, 1e-1, 0.2), (0.4, 1e-2, 0.3)]
    batch = ModelBatch([net(p=p, eps=e, slope=s) for p, e, s in settings], model_ids=list("abcd"))

    def own(m: nn.Module) -> tuple[float, float, float]:
        return (m[5].p, m[4].eps, m[1].negative_slope)

    assert [own(m) for m in batch.extract_all()] == settings
    batch.drop(["b"])
    assert [own(batch.extract(k)) for k in "acd"] == [settings[0], *settings[2:]]
    assert batch.stacked[5].per_model_p == [0.1, 0.3, 0.4]
    assert batch.stacked[4].per_model_eps == [1e-5, 1e-1, 1e-2]
    batch.keep_positions([2, 0])  # positions, not ids: d, then a
    assert batch.model_ids == ["d", "a"]
    assert [own(m) for m in batch.extract_all()] == [settings[3], settings[0]]
    assert batch.stacked[1].per_model_negative_slope == [0.3, 0.01]
    x = torch.randn(3, 2, 8, dtype=torch.float64)
    batch.eval()
    for mid in ("d", "a"):
        torch.testing.assert_close(batch(x)[batch.index_of(mid)], batch.extract(mid)(x))


def test_insert_refuses_other_settings() -> None:
    batch = ModelBatch([net(p=0.1), net(p=0.2)])
    batch.insert(1, net(p=0.2))
    batch.insert(0, net(p=0.1).eval())  # modes are not compared: nothing of them is written
    with pytest.raises(
        ArchitectureMismatchError,
        match=r"cannot insert into model 1: submodule '5' has p=0\.5 where model 1 was built "
        r"with p=0\.2; per-model settings are fixed when the batch is built",
    ):
        batch.insert(1, net(p=0.5))
    with pytest.raises(
        ArchitectureMismatchError,
        match=r"cannot insert into model 0: the module differs from the batch in submodule "
        r"'0' \(Conv1d\): attribute 'padding_mode'",
    ):
        batch.insert(0, net(padding_mode="circular"))


# ------------------------------------------------------------------ one key for models
def test_models_are_addressed_by_id_everywhere() -> None:
    torch.manual_seed(0)
    models = [net() for _ in range(4)]
    batch = ModelBatch(copy.deepcopy(models))
    batch.drop(0)
    assert batch.model_ids == [1, 2, 3]
    # extract(1) is the model with id 1 (now at position 0), not position 1.
    torch.testing.assert_close(batch.extract(1)[0].weight, models[1][0].weight)
    with pytest.raises(
        KeyError, match=r"no model with id 0 in this batch; valid ids are \[1, 2, 3\]"
    ):
        batch.extract(0)
    replacement = net()
    batch.insert(3, replacement)
    torch.testing.assert_close(batch.extract(3)[0].weight, replacement[0].weight)
    torch.testing.assert_close(batch.extract(2)[0].weight, models[2][0].weight)
    batch.quarantine(2)
    assert batch.active.tolist() == [True, False, True]
    with pytest.raises(KeyError, match=r"valid ids are \[1, 2, 3\]"):
        batch.insert(0, net())
    with pytest.raises(KeyError, match=r"no model with id 7"):
        batch.drop([7])
    with pytest.raises(IndexError, match="position 3 out of range for a batch of 3"):
        batch.keep_positions([3])


def test_string_ids() -> None:
    batch = ModelBatch([net(p=0.1), net(p=0.2)], model_ids=["small", "large"])
    assert batch.extract("large")[5].p == 0.2
    with pytest.raises(
        KeyError, match=r"no model with id 0 in this batch; valid ids are \['small', 'large'\]"
    ):
        batch.extract(0)


class FrozenStem(nn.Module):
    """Keeps its BatchNorm in eval whatever ``train()`` is called with (fine-tuning)."""

    def __init__(self) -> None:
        super().__init__()
        self.bn = nn.BatchNorm1d(4)
        self.fc = nn.Linear(4, 2)

    def train(self, mode: bool = True) -> FrozenStem:
        super().train(mode)
        self.bn.eval()
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.bn(x))


def test_a_model_that_overrides_train_keeps_its_frozen_layer() -> None:
    batch = ModelBatch([FrozenStem().train() for _ in range(2)])
    batch.eval()
    batch.train()
    assert batch.training and not batch.stacked.bn.training and batch.stacked.fc.training
    assert not batch.extract(0).bn.training


@pytest.mark.filterwarnings("ignore:`torch.nn.utils.weight_norm` is deprecated:FutureWarning")
def test_old_weight_norm_models_have_equal_structure() -> None:
    """The old ``torch.nn.utils.weight_norm`` keeps the computed weight as a plain tensor
    attribute: it is compared by shape, not by value."""
    a, b = (torch.nn.utils.weight_norm(nn.Linear(3, 4)) for _ in range(2))
    check_same_structure([a, b])
    assert structure_key(a) == structure_key(b)


class Config:
    def __init__(self, **kw: object) -> None:
        self.__dict__.update(kw)


class Configured(nn.Module):
    """Keeps its config, as Hugging Face modules do, and reads a rate from it in forward."""

    def __init__(self, config: Config) -> None:
        super().__init__()
        self.config = config
        self.fc = nn.Linear(3, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.dropout(self.fc(x), self.config.extra["attn_p"], self.training)  # type: ignore[attr-defined]


def test_a_config_difference_names_the_field() -> None:
    def make(p: float) -> nn.Module:
        return Configured(Config(hidden=3, extra={"attn_p": p, "act": "gelu"}))

    ModelBatch([make(0.1), make(0.1)])  # equal configs (distinct objects): fine
    with pytest.raises(
        ArchitectureMismatchError,
        match=r"submodule '<root>' \(Configured\): attribute 'config'\.extra\['attn_p'\] is 0\.2 "
        r"where model 0 has 0\.1",
    ):
        ModelBatch([make(0.1), make(0.2)])


def test_graph_networks_with_different_dropout_share_a_batch() -> None:
    """torch_geometric's message-passing layers keep an inspector whose source cache is
    filled by whichever instance comes first: a cache, not a setting."""
    pyg = pytest.importorskip("torch_geometric.nn")
    a, b = pyg.GCN(4, 8, 2, dropout=0.1), pyg.GCN(4, 8, 2, dropout=0.3)
    check_same_structure([a, b])
    assert structure_key(a) == structure_key(b)
    with pytest.raises(ArchitectureMismatchError, match=r"attribute 'improved' is True"):
        check_same_structure([pyg.GCNConv(4, 8), pyg.GCNConv(4, 8, improved=True)])


class CachedTranspose(nn.Module):
    """Keeps a view of its weight, made when built (``self.wt = self.lin.weight.t()``): alone
    the view follows the weight through training; a batch would keep model 0's tensor."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(3, 3)
        self.wt = self.lin.weight.t()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x @ self.wt


class CachedProduct(nn.Module):
    """Keeps a tensor computed from its weight when built (``2 * weight``): each model alone
    uses its own; a batch would give every model model 0's."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(3, 3)
        self.w2 = self.lin.weight * 2

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lin(x) + x @ self.w2


def test_a_tensor_attribute_viewing_a_parameter_is_refused() -> None:
    """Model 1 silently ran model 0's weight (and no model's weight got a gradient through
    that path): refused, naming the attribute, the parameter and the way out."""
    with pytest.raises(ArchitectureMismatchError) as info:
        ModelBatch([CachedTranspose() for _ in range(2)])
    message = str(info.value)
    assert "'wt'" in message and "lin.weight" in message and "in forward" in message, message


def test_a_tensor_attribute_computed_from_the_weights_is_compared_by_value() -> None:
    torch.manual_seed(0)
    with pytest.raises(ArchitectureMismatchError, match="attribute 'w2'"):
        ModelBatch([CachedProduct() for _ in range(2)])
    twins = modelbatch.seeded_models(CachedProduct, [3, 3])  # equal: model 0's is each's
    x = torch.randn(4, 3)
    out = ModelBatch(twins)(x)
    torch.testing.assert_close(out[1], twins[1](x))
