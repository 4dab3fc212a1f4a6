import ast
import copy
import dataclasses
import inspect

import pytest

from fastlocal import config
from fastlocal.config import (
    Config,
    ConfigError,
    apply_overrides,
    build_config,
    from_dict,
    resolve_num_modules,
    to_dict,
    to_toml,
    validate,
)
from fastlocal.methods import METHODS


def test_defaults_are_valid():
    cfg = build_config(None, (), METHODS)
    assert cfg.data.source == "bundled"


def test_toml_then_overrides(tmp_path):
    path = tmp_path / "c.toml"
    path.write_text('[method]\nname = "dgl"\nnum_modules = 4\n[train]\nepochs = 3\n')
    cfg = build_config(path, ["method.num_modules=8", "--optim.lr=0.05", "log.progress=false"], METHODS)
    assert (cfg.method.name, cfg.method.num_modules, cfg.train.epochs) == ("dgl", 8, 3)
    assert cfg.optim.lr == 0.05 and cfg.log.progress is False


def test_round_trip_through_toml(tmp_path):
    cfg = build_config(None, ["method.name=dgl", 'data.root=a "quoted" path'], METHODS)
    path = tmp_path / "r.toml"
    path.write_text(to_toml(cfg))
    assert to_dict(build_config(path, (), METHODS)) == to_dict(cfg)
    assert to_dict(from_dict(to_dict(cfg), METHODS)) == to_dict(cfg)


@pytest.mark.parametrize(
    "override,fragment",
    [
        ("method.nmae=3", "unknown config key 'method.nmae'; valid keys in [method]"),
        ("nosection.key=1", "section one of"),
        ("train.epochs=three", "train.epochs must be an integer"),
        ("train.epochs=0", "train.epochs = 0 is too small"),
        ("method.name=backprop", "method.name = 'backprop' is not valid; choose one of"),
        ("model.arch=vgg", "model.arch = 'vgg' is not valid"),
        ("optim.lr=-1", "optim.lr = -1.0 is not valid"),
        ("log.progress=maybe", "log.progress must be true or false"),
    ],
)
def test_bad_values_name_the_key_and_what_is_valid(override, fragment):
    with pytest.raises(ConfigError) as err:
        build_config(None, [override], METHODS)
    assert fragment in str(err.value)


def test_bad_toml_file(tmp_path):
    path = tmp_path / "bad.toml"
    path.write_text("[method\nname=")
    with pytest.raises(ConfigError, match="not valid TOML"):
        build_config(path, (), METHODS)
    with pytest.raises(ConfigError, match="not found"):
        build_config(tmp_path / "missing.toml", (), METHODS)


@pytest.mark.parametrize(
    "overrides,fragment",
    [  # choices come from the fields' Literal annotations, minimums from their Min
        (["mlaan.lam_mode=paper"], "mlaan.lam_mode = 'paper' is not valid; choose one of: copies, literal"),
        (["system.fused_batch_norm=yes"], "choose one of: auto, true, false"),
        (["data.flip=true"], "data.flip = 'true' is not valid; choose one of: auto, on, off"),
        (["method.head=3c3f"], "choose one of: auto, 0c1f, 0c2f, 1c1f, 1c2f, 1c3f, 2c2f"),
        (["data.pad=-2"], "data.pad = -2 is too small; it must be at least -1"),
        (["mlaan.window=0"], "mlaan.window = 0 is too small; it must be at least 1"),
        (["optim.warmup_epochs=-0.5"], "optim.warmup_epochs = -0.5 is too small; it must be at least 0"),
        (["method.name=bp", "method.num_modules=3"], "method.num_modules must be 1 (got 3)"),
        (["method.name=mlaan", "mlaan.window=4"], "mlaan.window = 4 with method.num_modules = 4"),  # K = the default 4
        (["system.sync_batch_norm=true", "system.fused_batch_norm=true"], "do not combine"),
    ],
)
def test_field_annotations_and_rules_reject_bad_values(overrides, fragment):
    with pytest.raises(ConfigError) as err:
        build_config(None, overrides, METHODS)
    assert fragment in str(err.value)


@pytest.mark.parametrize(
    "overrides",
    [
        [],
        ["method.name=bp"],
        ["method.name=dgl", "method.head=2c2f"],
        ["data.source=imagefolder", "data.root=somewhere", "system.cuda_graphs=TRUE"],
    ],
)
def test_validate_leaves_the_config_unchanged(overrides):
    cfg = Config()
    apply_overrides(cfg, overrides)
    before = copy.deepcopy(cfg)
    assert validate(cfg, METHODS) is cfg
    assert cfg == before


@pytest.mark.parametrize("method,default_k", [("bp", 1), ("dgl", 4), ("infopro", 4), ("mlaan", 4)])
def test_num_modules_zero_is_the_method_default(method, default_k):
    cfg = build_config(None, [f"method.name={method}"], METHODS)
    assert cfg.method.num_modules == 0 and resolve_num_modules(cfg.method) == default_k
    if method != "bp":
        cfg = build_config(None, [f"method.name={method}", "method.num_modules=3"], METHODS)
        assert resolve_num_modules(cfg.method) == 3


def test_every_config_field_has_a_docstring():
    """A field's docstring is the string expression right after it in the class body."""
    classes = {type(getattr(Config(), f.name)).__name__ for f in dataclasses.fields(Config)} | {"Config"}
    tree = ast.parse(inspect.getsource(config))
    missing = []
    for node in tree.body:
        if isinstance(node, ast.ClassDef) and node.name in classes:
            body = node.body
            for i, item in enumerate(body):
                following = body[i + 1] if i + 1 < len(body) else None
                documented = (
                    isinstance(following, ast.Expr)
                    and isinstance(following.value, ast.Constant)
                    and isinstance(following.value.value, str)
                )
                if isinstance(item, ast.AnnAssign) and not documented:
                    missing.append(f"{node.name}.{item.target.id}")
    assert len(classes) == 11 and not missing  # Config and its ten sections
