"""Site discovery on real architectures: counts and roles derived from each architecture's construction."""

from __future__ import annotations

import warnings
from collections import Counter

import pytest
import timm
import torch
import torch.nn as nn
import torch.nn.functional as F

from graphsparse.graph.activations import activation_kind_of_module, is_gate_kind
from graphsparse.graph.capture import PartialCaptureWarning, capture
from graphsparse.graph.sites import find_sites, sites_of_capture


def _running_activation_modules(model: nn.Module, x: torch.Tensor) -> set[str]:
    """Ground truth: paths of non-gate activation modules that actually run (forward hooks, eager)."""
    ran: set[str] = set()
    handles = []
    for path, mod in model.named_modules():
        kind = activation_kind_of_module(mod)
        if kind is not None and not is_gate_kind(kind):
            handles.append(mod.register_forward_hook(lambda m, i, o, p=path: ran.add(p)))
    with torch.no_grad():
        model.eval()(x)
    for h in handles:
        h.remove()
    return ran


def _sites(model, shape):
    x = torch.randn(*shape)
    cap = capture(model.eval(), x)
    assert cap.max_abs_diff == 0.0
    with warnings.catch_warnings():
        warnings.simplefilter("error", PartialCaptureWarning)  # nothing that ran was missed
        sites = sites_of_capture(cap)
    assert sites.missed == [] and cap.missed == []
    assert [s.depth for s in sites] == list(range(len(sites)))
    assert len({s.id for s in sites}) == len(sites)
    module_sites = {s.module for s in sites if s.op != "add"}
    missing = _running_activation_modules(model, x) - module_sites
    assert not missing, f"activation modules not found as sites: {sorted(missing)}"
    return cap, sites


def test_resnet18_matches_the_paper_indexing():
    _, sites = _sites(timm.create_model("resnet18"), (1, 3, 64, 64))
    roles = Counter(s.role for s in sites)
    assert len(sites) == 17 and roles == {"stem": 1, "main_path": 8, "after_addition": 8}
    assert all(s.op == "relu" and s.layout == "nchw" and s.channel_axis == 1 for s in sites)
    by_id = {s.id: s for s in sites}
    assert by_id["act1"].role == "stem"
    for stage, width in enumerate((64, 128, 256, 512), start=1):
        for block in (0, 1):
            main = by_id[f"layer{stage}.{block}.act1"]
            after = by_id[f"layer{stage}.{block}.act2"]
            assert (main.role, after.role) == ("main_path", "after_addition")
            assert main.channels == after.channels == width
            assert main.stage == after.stage == stage
    lasts = [s.id for s in sites if s.last_in_stage]
    assert lasts == [f"layer{i}.1.act2" for i in range(1, 5)]


def test_ids_are_stable_across_runs():
    a = find_sites(timm.create_model("resnet18"), torch.randn(1, 3, 64, 64))
    b = find_sites(timm.create_model("resnet18"), torch.randn(1, 3, 64, 64))
    assert [s.to_dict() for s in a] == [s.to_dict() for s in b]


def test_dm_wide_resnet_preactivation_with_autograd_swish(robustbench_archs):
    dm, _ = robustbench_archs
    depth = 16
    model = dm.DMWideResNet(depth=depth, width=1, activation_fn=dm.Swish)
    cap, sites = _sites(model, (2, 3, 32, 32))
    blocks = 3 * (depth - 4) // 6
    roles = Counter(s.role for s in sites)
    assert roles == {"main_path": 2 * blocks, "after_addition": blocks, "head": 1}
    assert {s.op for s in sites if s.role == "main_path"} == {"silu"}
    assert {s.op for s in sites if s.role == "after_addition"} == {"add"}
    # the autograd.Function activation is a leaf module call, reached in the graph
    assert all(s.reached == "graph" for s in sites)


def test_dm_preact_resnet_silu(robustbench_archs):
    dm, _ = robustbench_archs
    model = dm.DMPreActResNet(depth=18, width=0, activation_fn=nn.SiLU, use_cuda=False)
    _, sites = _sites(model, (2, 3, 32, 32))
    blocks = 8
    assert Counter(s.role for s in sites) == {"main_path": 2 * blocks, "after_addition": blocks, "head": 1}


@pytest.mark.parametrize("name", ["seresnet18", "efficientnet_b0"])
def test_squeeze_excitation_internals_are_in_se_and_gates_are_not_sites(name):
    model = timm.create_model(name)
    _, sites = _sites(model, (1, 3, 64, 64))
    se_modules = [
        m for m in model.modules() if "SqueezeExcite" in type(m).__name__ or type(m).__name__ == "SEModule"
    ]
    in_se = [s for s in sites if s.role == "in_se"]
    assert len(se_modules) > 0 and len(in_se) == len(se_modules)
    assert all(s.channels < 64 or s.layout == "nchw" for s in in_se)
    assert not [s for s in sites if s.op in ("sigmoid", "hardsigmoid", "tanh")]


def test_efficientnet_reaches_activations_inside_batchnormact_leaves():
    model = timm.create_model("efficientnet_b0")
    _, sites = _sites(model, (1, 3, 64, 64))
    tree = [s for s in sites if s.reached == "module_tree"]
    bn_acts = [
        p
        for p, m in model.named_modules()
        if p.endswith(".act")
        and activation_kind_of_module(m) is not None
        and "BatchNormAct" in type(model.get_submodule(p.rsplit(".", 1)[0])).__name__
    ]
    assert {s.id for s in tree} == set(bn_acts)
    assert all(s.channels == model.get_submodule(s.id.rsplit(".", 1)[0]).num_features for s in tree)


def test_mobilenetv3_hardswish_and_hardsigmoid_gates():
    model = timm.create_model("mobilenetv3_small_100")
    _, sites = _sites(model, (1, 3, 64, 64))
    ops = Counter(s.op for s in sites)
    assert ops["hardswish"] > 0 and ops["hardsigmoid"] == 0
    se_count = sum(1 for m in model.modules() if type(m).__name__ == "SqueezeExcite")
    assert sum(s.role == "in_se" for s in sites) == se_count


def test_convnext_conv_mlp_variant_is_channels_first():
    model = timm.create_model("convnext_atto", conv_mlp=True)
    _, sites = _sites(model, (1, 3, 64, 64))
    gelus = [s for s in sites if s.op == "gelu"]
    assert gelus and all(s.role == "mlp" and s.layout == "nchw" and s.channel_axis == 1 for s in gelus)


def test_convnext_mlp_is_channels_last():
    model = timm.create_model("convnext_atto", conv_mlp=False)
    _, sites = _sites(model, (1, 3, 64, 64))
    blocks = sum(model.stages[i].blocks.__len__() for i in range(4))
    gelus = [s for s in sites if s.op == "gelu"]
    assert len(gelus) == blocks and all(s.role == "mlp" for s in gelus)
    assert all(s.layout == "nhwc" and s.channel_axis == -1 for s in gelus)
    # the MLP is 4x wide: channels come from the last axis, not from shape[1] (the height)
    widths = [s.channels for s in gelus]
    assert widths[0] == 4 * model.stages[0].blocks[0].conv_dw.out_channels
    adds = [s for s in sites if s.op == "add"]
    assert len(adds) == blocks and all(s.role == "after_addition" and s.channel_axis == 1 for s in adds)


@pytest.mark.parametrize(
    "name,kwargs",
    [
        ("vit_tiny_patch16_224", {"img_size": 64}),
        ("swin_tiny_patch4_window7_224", {"img_size": 64, "window_size": 2}),
    ],
)
def test_transformer_token_mlp(name, kwargs):
    model = timm.create_model(name, **kwargs)
    _, sites = _sites(model, (1, 3, 64, 64))
    n_blocks = sum(1 for m in model.modules() if type(m).__name__.endswith("Block") and hasattr(m, "mlp"))
    gelus = [s for s in sites if s.op == "gelu"]
    assert len(gelus) == n_blocks and all(s.role == "mlp" and s.channel_axis == -1 for s in gelus)
    assert all(
        s.channels == 4 * model.get_submodule(s.module.rsplit(".", 1)[0]).fc1.in_features for s in gelus
    )
    adds = [s for s in sites if s.role == "after_addition"]
    assert len(adds) == 2 * n_blocks and all(s.channel_axis == -1 for s in adds)


def test_a_position_embedding_resampled_to_the_input_is_not_a_residual_at_any_batch_size():
    # test_vit resamples its position embedding to the token grid read off the input's shape: the add
    # joins a weight, not a second path, whether or not the batch of 1 makes the shapes equal
    model = timm.create_model("test_vit")
    ids = {b: [s.id for s in _sites(model, (b, 3, 160, 160))[1]] for b in (1, 3)}
    assert ids[1] == ids[3] and "add" not in ids[1]
    blocks = sum(1 for m in model.modules() if type(m).__name__ == "Block")
    assert sum(i.endswith(("add", "add_1")) and i.startswith("blocks.") for i in ids[1]) == 2 * blocks


def test_densenet_has_no_residual_additions():
    model = timm.create_model("densenet121")
    _, sites = _sites(model, (1, 3, 64, 64))
    assert not [s for s in sites if s.role == "after_addition"]
    layers = sum(1 for m in model.modules() if type(m).__name__ == "DenseLayer")
    transitions = sum(1 for m in model.modules() if type(m).__name__ == "DenseTransition")
    assert len(sites) == 2 * layers + transitions + 2


def test_robustarch_wrn_root_falls_back_and_se_inside(robustbench_archs):
    _, ra = robustbench_archs
    model = ra.NormalizedWideResNet(
        mean=(0.5, 0.5, 0.5),
        std=(0.25, 0.25, 0.25),
        stem_width=16,
        depth=(1, 1, 1),
        stage_width=(16, 32, 64),
        groups=(1, 1, 1),
        activation_fn=nn.SiLU,
        se_ratio=0.25,
        se_activation=nn.ReLU,
        se_order=2,
    )
    cap, sites = _sites(model, (2, 3, 32, 32))
    root = [o for o in cap.opaque if o.path == ""]
    assert root and "control flow" in root[0].reason
    assert "layer" in cap.graphs
    assert sum(s.role == "in_se" for s in sites) == 3
    head = [s for s in sites if s.role == "head"]
    assert [s.id for s in head] == ["relu"] and head[0].reached == "module_tree"


class _FunctionalNet(nn.Module):
    """Activations in every spelling: module, functional, tensor method, in-place."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1)
        self.conv3 = nn.Conv2d(8, 8, 3, padding=1)
        self.act = nn.GELU()
        self.fc = nn.Linear(8, 4)

    def forward(self, x):
        x = self.bn(F.relu(self.conv1(x)))  # the relu is strictly before the block's fork: stem
        y = torch.relu(self.conv2(x))
        y = self.conv3(y).relu_()
        x = x + y
        x = F.silu(x, inplace=True)
        x = self.act(x).mean((2, 3))
        return self.fc(x.tanh())


def test_functional_method_and_inplace_spellings():
    _, sites = _sites(_FunctionalNet(), (2, 3, 16, 16))
    assert [(s.id, s.op, s.role) for s in sites] == [
        ("relu", "relu", "stem"),
        ("relu_1", "relu", "main_path"),
        ("relu_2", "relu", "main_path"),
        ("silu", "silu", "after_addition"),
        ("act", "gelu", "head"),
        ("tanh", "tanh", "head"),
    ]
    assert sites[-1].layout == "nc" and sites[-1].channels == 8


def _module_state(model: nn.Module) -> list:
    """Everything capture could change on a model: per module its attribute names, the identity of every
    attribute value, parameters, buffers, children and hooks, and its train/eval flag."""
    state = []
    for path, m in model.named_modules():
        attrs = {k: id(v) for k, v in m.__dict__.items()}
        dicts = {
            k: {n: id(x) for n, x in v.items()}
            for k, v in m.__dict__.items()
            if isinstance(v, dict) and (k in ("_parameters", "_buffers", "_modules") or "hook" in k)
        }
        state.append((path, sorted(attrs), attrs, dicts, m.training))
    return state


def _small_eva02():
    # eva02's rotary embedding is a tensor constant fx stores on the traced root as `_tensor_constantN`
    return timm.create_model("eva02_tiny_patch14_224", img_size=56, depth=2).train()


def test_find_sites_plan_and_rewrite_leave_the_model_exactly_as_it_was():
    from graphsparse.planning.plan import make_plan
    from graphsparse.planning.rewrite import rewrite

    model = _small_eva02()
    model.blocks[0].norm1.eval()  # a frozen submodule's own flag must survive too
    before = _module_state(model)
    x = torch.randn(1, 3, 56, 56)
    find_sites(model, x)
    assert _module_state(model) == before
    make_plan(find_sites(model, x), "after_addition")
    assert _module_state(model) == before
    rewrite(model, "after_addition", x)
    assert _module_state(model) == before


@pytest.mark.slow
def test_an_artifact_rewritten_after_find_sites_loads(tmp_path):
    from graphsparse.artifact.io import load, save
    from graphsparse.planning.rewrite import rewrite

    model = _small_eva02().eval()
    x = torch.randn(1, 3, 56, 56)
    find_sites(model, x)
    rewritten = rewrite(model, "after_addition", x)
    save(rewritten, tmp_path / "eva.safetensors")
    loaded = load(tmp_path / "eva.safetensors", base=_small_eva02())
    with torch.no_grad():
        assert torch.equal(loaded(x), rewritten(x))


class _Block(nn.Module):
    def __init__(self, c: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(c, c, 3, padding=1)

    def forward(self, x):
        return x + F.relu(self.conv(x))


class _EagerRootWithContainers(nn.Module):
    """A root fx cannot trace (control flow on a tensor) that iterates a ModuleList, and iterates, indexes
    and measures a Sequential, as Hugging Face encoders do."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 4, 3, padding=1)
        self.layers = nn.ModuleList([_Block(4), _Block(4)])
        self.stages = nn.Sequential(_Block(4), _Block(4))
        self.by_name = nn.ModuleDict({"last": _Block(4)})
        self.fc = nn.Linear(4, 3)

    def forward(self, x):
        x = self.stem(x)
        if x.sum() > -1e9:  # data-dependent: the root stays eager
            for layer in self.layers:
                x = layer(x)
        for i in range(len(self.stages)):
            x = self.stages[i](x)
        x = self.by_name["last"](x)
        return self.fc(x.mean((2, 3)))


def test_fallback_traces_inside_modulelist_sequential_and_moduledict_and_keeps_them_iterable():
    model = _EagerRootWithContainers()
    cap, sites = _sites(model, (2, 3, 8, 8))
    blocks = ["layers.0", "layers.1", "stages.0", "stages.1", "by_name.last"]
    assert set(blocks) <= set(cap.graphs)
    assert type(cap.model.layers) is nn.ModuleList and type(cap.model.stages) is nn.Sequential
    # the functional relus and the residual additions inside the blocks are graph sites
    assert [(s.id, s.role) for s in sites] == [
        pair for b in blocks for pair in ((f"{b}.relu", "main_path"), (f"{b}.add", "after_addition"))
    ]
    assert all(s.reached == "graph" for s in sites)


class _OneCallGelu(nn.Module):
    def forward(self, x):
        return F.gelu(x, approximate="tanh")


class _ChosenAct(nn.Module):
    def __init__(self, fn) -> None:
        super().__init__()
        self.fn = fn

    def forward(self, x):
        return self.fn(x)


class _TwoOps(nn.Module):
    def forward(self, x):
        return F.relu(x) * 2


def test_a_parameter_free_module_whose_forward_is_one_activation_call_is_an_activation():
    assert activation_kind_of_module(_OneCallGelu()) == "gelu"
    assert activation_kind_of_module(_ChosenAct(F.silu)) == "silu"
    assert activation_kind_of_module(_ChosenAct(torch.relu)) == "relu"
    assert activation_kind_of_module(_TwoOps()) is None
    assert activation_kind_of_module(nn.Identity()) is None and activation_kind_of_module(nn.Dropout()) is None


def test_transformers_activation_classes_are_matched_by_name_without_importing_transformers():
    # a class spelled as transformers spells it, defined here: matching must not need the library
    fake = type("NewGELUActivation", (nn.Module,), {"forward": lambda self, x: 0.5 * x * (1 + torch.tanh(x))})
    fake.__module__ = "transformers.activations"
    assert activation_kind_of_module(fake()) == "gelu"
    fake.__qualname__ = "QuickGELUActivation"
    assert activation_kind_of_module(fake()) == "quick_gelu"


class _GeluAfterFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return x * 1.0

    @staticmethod
    def backward(ctx, g):
        return g


class _OpaqueGelu(nn.Module):
    """An opaque leaf (it calls an autograd.Function) hiding a functional gelu."""

    def forward(self, x):
        return F.gelu(_GeluAfterFunction.apply(x))


class HidesActivations(nn.Module):
    """One activation capture reaches (a ReLU module) and two it cannot: a functional gelu inside an opaque
    leaf, and torch's TransformerEncoderLayer, a torch.nn layer with a functional relu inside."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3)
        self.act = nn.ReLU()
        self.hidden = _OpaqueGelu()
        self.encoder = nn.TransformerEncoderLayer(8, 2, 16, dropout=0.0)
        self.fc = nn.Linear(8, 2)

    def forward(self, x):
        tokens = self.hidden(self.act(self.conv(x))).flatten(2).permute(2, 0, 1)
        return self.fc(self.encoder(tokens).mean(0))


def test_activations_that_ran_but_are_not_sites_are_a_warning_naming_them():
    model = HidesActivations().eval()
    x = torch.randn(1, 3, 8, 8)
    cap = capture(model, x)
    with pytest.warns(PartialCaptureWarning, match=r"2 activation place\(s\).*hidden \(_OpaqueGelu\)") as rec:
        sites = sites_of_capture(cap)
    assert "1 relu call in encoder (TransformerEncoderLayer)" in str(rec[0].message)
    assert [s.id for s in sites] == ["act"]
    assert sites.missed == cap.missed == [
        "1 gelu call in hidden (_OpaqueGelu)",
        "1 relu call in encoder (TransformerEncoderLayer)",
    ]
    with pytest.warns(PartialCaptureWarning):
        assert find_sites(model, x).missed == sites.missed


def test_inspect_shows_what_capture_missed():
    from click.testing import CliRunner

    from graphsparse.cli import main

    spec = f"{HidesActivations.__module__}:HidesActivations"
    top = HidesActivations.__module__.split(".")[0]
    res = CliRunner().invoke(main, ["inspect", spec, "--input-shape", "1,3,8,8", "--allow-module", top])
    assert res.exit_code == 0, res.output
    assert "missed: 1 gelu call in hidden (_OpaqueGelu)" in res.output
    assert "missed: 1 relu call in encoder (TransformerEncoderLayer)" in res.output


def test_a_rule_matching_nothing_because_capture_found_nothing_says_so():
    from graphsparse.errors import RuleError
    from graphsparse.planning.plan import make_plan

    no_activation = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Flatten(), nn.Linear(4 * 6 * 6, 2))
    with pytest.raises(RuleError) as err:
        make_plan(find_sites(no_activation, torch.randn(1, 3, 8, 8)), "after_addition")
    assert "Capture found no site at all" in str(err.value) and "optional: true" not in str(err.value)

    model = HidesActivations().eval()
    with pytest.warns(PartialCaptureWarning):
        sites = find_sites(model, torch.randn(1, 3, 8, 8))
    with pytest.raises(RuleError, match=r"Capture missed 2 activation place\(s\).*gelu call in hidden"):
        make_plan(sites, "after_addition")


def test_find_sites_is_a_list_that_shows_as_a_table():
    from graphsparse.graph.sites import Site

    sites = find_sites(_FunctionalNet(), torch.randn(2, 3, 16, 16))
    assert isinstance(sites, list) and all(isinstance(s, Site) for s in sites)
    assert sites[1:3] == list(sites)[1:3] and len(sites) == 6
    rows = sites.to_rows()
    assert [r["id"] for r in rows] == [s.id for s in sites] and rows[0]["shape"] == list(sites[0].shape)
    page = sites._repr_html_()
    assert page.count("<tr>") == len(sites) + 1  # a header row, then one row per site
    assert "<td>after_addition</td>" in page and "<td>tanh</td>" in page
