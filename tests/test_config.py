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
    beauty = load_config("amazon14-beauty")
    assert (beauty.data.format, beauty.data.max_history, beauty.instructions.max_history) == ("amazon14_beauty", 20, 20)


def test_missing_config_file(tmp_path):
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(str(tmp_path / "nope.yaml"))


def test_every_option_is_typed_and_described():
    from sidrec.config import describe
    from sidrec.serve.settings import ServeAppConfig, ServeSettings

    rows = describe() + describe(ServeSettings, "user_config") + describe(ServeAppConfig, "args")
    assert len(rows) > 100
    assert [name for name, _, _, text in rows if not text.strip()] == []


@pytest.mark.parametrize(
    "section, data, message",
    [
        ("ServeSettings", {"store_root": "/s", "num_beams": 0}, "user_config.num_beams must be >= 1, got 0"),
        ("ServeSettings", {"store_root": "relative/dir"}, "user_config.store_root must be an absolute path"),
        ("ServeSettings", {"store_root": "/s", "beams": 4}, "unknown option 'user_config.beams'"),
        ("ServeSettings", {"store_root": "/s", "scoring": "max"}, "user_config.scoring must be one of"),
        ("SASRecConfig", {"dropout": 1.5}, "eval.sasrec.dropout must be < 1"),
        ("TrainConfig", {"epochs": "3"}, "train.epochs must be an integer, got '3'"),
    ],
)
def test_sections_built_from_mappings_name_the_dotted_option(section, data, message):
    import sidrec.config as c
    import sidrec.serve.settings as serve

    with pytest.raises(ConfigError) as e:
        c.section_from_dict(getattr(c, section, None) or getattr(serve, section), data)
    assert message in str(e.value)


def test_nested_override_names_the_full_path():
    with pytest.raises(ConfigError, match=r"^eval\.sasrec\.epochs must be >= 1, got 0$"):
        config_from_dict({}, ["eval.sasrec.epochs=0"])
