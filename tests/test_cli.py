import pytest

from sidrec.cli import main


def test_help_lists_every_subcommand(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert "sids" in out and "train" in out


@pytest.mark.parametrize(
    "args, message",
    [
        (["train", "--config", "tiny-cpu", "train.strategy=horovod"], "train.strategy"),
        (["train", "--config", "tiny-cpu", "train.num_workers=0"], "train.num_workers"),
        (["train", "--config", "tiny-cpu", "train.deepspeed_config=nope.json", "train.strategy=deepspeed"],
         "train.deepspeed_config"),
        (["train", "--config", "no-such-config"], "config file not found"),
        (["sids", "build", "--config", "ml-100k", "quantize.method=pq"], "quantize.method"),
    ],
)
def test_bad_options_exit_2_naming_the_option(args, message, capsys):
    assert main(args) == 2
    assert message in capsys.readouterr().err
