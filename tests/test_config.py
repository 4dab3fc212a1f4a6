import pytest

from fastlocal.config import ConfigError, build_config, from_dict, to_dict, to_toml
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
    cfg = build_config(None, ["method.name=dgl", "data.root=a \"quoted\" path"], METHODS)
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
