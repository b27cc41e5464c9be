import pytest

from sidrec.config import ConfigError, config_from_dict, load_config


def test_defaults_validate():
    cfg = config_from_dict({})
    assert cfg.embed.model == "bundled"
    assert cfg.quantize.levels == 3 and cfg.quantize.codebook_size == 256


def test_dotted_overrides_parse_yaml_scalars():
    cfg = config_from_dict({"embed": {"batch_size": 8}}, ["embed.batch_size=32", "quantize.levels=4",
                                                           "sids.collision=keep", "embed.normalize=false"])
    assert cfg.embed.batch_size == 32
    assert cfg.quantize.levels == 4
    assert cfg.sids.collision == "keep"
    assert cfg.embed.normalize is False


@pytest.mark.parametrize(
    "data, overrides, message",
    [
        ({"embed": {"batchsize": 3}}, [], "unknown option 'embed.batchsize'"),
        ({}, ["embed.batch_size=0"], "embed.batch_size must be >= 1, got 0"),
        ({}, ["embed.batch_size=abc"], "embed.batch_size must be an integer"),
        ({}, ["sids.collision=maybe"], "sids.collision must be one of ['keep', 'dedup']"),
        ({}, ["quantize.levels=0"], "levels"),
        ({"data": {"format": "generic"}}, [], "data.catalog is required"),
        ({}, ["embed"], "must look like section.option=value"),
    ],
)
def test_bad_values_name_the_option(data, overrides, message):
    with pytest.raises(ConfigError) as e:
        config_from_dict(data, overrides)
    assert message in str(e.value)


def test_shipped_configs_load_and_resolve_paths(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cfg = load_config("ml-100k")
    assert cfg.data.format == "movielens_100k"
    assert cfg.store.root == str(tmp_path / "artifacts" / "ml-100k")
    assert load_config("amazon-industrial").data.format == "amazon_prepared"


def test_missing_config_file(tmp_path):
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(str(tmp_path / "nope.yaml"))
