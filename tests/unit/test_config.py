"""Config: defaults < TOML < environment < flags, with clear errors."""

import pathlib

import pytest

from aivailable.config import Config, ConfigError, load_config


def test_defaults_are_safe_for_a_single_machine():
    config = load_config(environ={})
    assert config.bind == "127.0.0.1" and config.port == 8000 and config.mdns
    assert config.model == "builtin:smollm2-135m"


def test_later_sources_win(tmp_path):
    toml = tmp_path / "a.toml"
    toml.write_text('port = 9000\nname = "toml"\ngpu = ["fake:A:1GiB"]\nn-ctx = 1024\n')
    config = load_config(
        {"name": "flag"}, toml, environ={"AIVAILABLE_PORT": "9100", "AIVAILABLE_MDNS": "false"}
    )
    assert (config.name, config.port, config.mdns) == ("flag", 9100, False)
    assert config.gpu == ("fake:A:1GiB",) and config.n_ctx == 1024


def test_environment_lists_and_paths():
    config = load_config(environ={"AIVAILABLE_JOIN": "a:1, b:2", "AIVAILABLE_DATA_DIR": "/x/y"})
    assert config.join == ("a:1", "b:2") and config.data_dir == pathlib.Path("/x/y")
    assert config.key_file == pathlib.Path("/x/y/cluster.key")


@pytest.mark.parametrize("environ", [{"AIVAILABLE_PORT": "eighty"}, {"AIVAILABLE_MDNS": "maybe"}])
def test_bad_values_are_config_errors(environ):
    with pytest.raises(ConfigError):
        load_config(environ=environ)


def test_unknown_toml_keys_and_unreadable_files_are_errors(tmp_path):
    toml = tmp_path / "b.toml"
    toml.write_text("colour = 'blue'\n")
    with pytest.raises(ConfigError, match="colour"):
        load_config(toml_path=toml, environ={})
    with pytest.raises(ConfigError):
        load_config(toml_path=tmp_path / "missing.toml", environ={})


def test_a_wildcard_bind_advertises_a_real_address():
    from aivailable.config import first_lan_address

    assert Config(bind="0.0.0.0", port=1).advertise_host == first_lan_address()
    assert first_lan_address() not in ("0.0.0.0", "")
    config = Config(bind="0.0.0.0", advertise="10.0.0.5", port=1)
    assert config.advertise_addr == "10.0.0.5:1" and config.advertise_host == "10.0.0.5"
    assert Config(bind="127.0.0.2", port=2).advertise_addr == "127.0.0.2:2"


def test_nested_sections_override_single_fields(tmp_path):
    toml = tmp_path / "c.toml"
    toml.write_text(
        "[raft]\ntick_interval_ms = 50\n[gossip]\nprobe_interval = 1.0\n"
        "[controller]\nsuspect_grace_s = 2.5\n[forward]\nstall_timeout_s = 30\n"
        "[engine]\nn_threads = 2\n[membership]\nsmall_voters = 1\n"
    )
    config = load_config(toml_path=toml, environ={})
    assert config.raft.tick_interval_ms == 50 and config.raft.election_ticks == 10
    assert config.gossip.probe_interval == 1.0
    assert config.controller.suspect_grace_s == 2.5 and config.forward.stall_timeout_s == 30
    assert config.engine.n_threads == 2 and config.membership.small_voters == 1
    toml.write_text("[raft]\nno_such_knob = 1\n")
    with pytest.raises(ConfigError, match="raft"):
        load_config(toml_path=toml, environ={})
