"""Config loading: a bad file names its field; every key is documented."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from gateway.config import ConfigError, load_config

ROOT = Path(__file__).resolve().parent.parent
EXAMPLE_ENV = {
    "OPENAI_API_KEY": "sk-x", "ANTHROPIC_API_KEY": "sk-y", "ARK_API_KEY": "ark-z",
    "VOLC_ACCESS_KEY": "AK", "VOLC_SECRET_KEY": "SK",
}


def config_keys() -> set[str]:
    """Every key name gateway/config.py reads from a TOML table."""
    src = (ROOT / "gateway" / "config.py").read_text()
    return set(re.findall(r'\.(?:text|num|flag|array|sub)\(\s*"([a-z_]+)"', src))


def test_every_config_key_is_documented_in_the_example() -> None:
    example = (ROOT / "config.example.toml").read_text()
    keys = config_keys()
    assert len(keys) > 40
    missing = [k for k in sorted(keys) if not re.search(rf"(^|[\s{{,\[])#?\s*\[*{k}\]*\s*(=|\]|$)", example, re.M)]
    assert missing == []


def test_example_config_loads(tmp_path: Path) -> None:
    path = tmp_path / "c.toml"
    path.write_text((ROOT / "config.example.toml").read_text())
    cfg = load_config(path, env=EXAMPLE_ENV)
    assert cfg.database.path == tmp_path / "gateway.db"
    assert cfg.upstream("openai").api_key == "sk-x"
    assert "sk-x" not in repr(cfg), "secrets stay out of repr (and so out of logs)"
    assert cfg.model("gpt-5.5") is not None and cfg.group("partners") is not None


BASE = """
[[upstreams]]
name = "u"
kind = "openai"
base_url = "http://127.0.0.1:1/v1"
[[models]]
name = "m"
routes = [{ upstream = "u" }]
"""


@pytest.mark.parametrize(
    ("toml", "field"),
    [
        ("[server]\nport = 'eighty'\n" + BASE, "server.port"),
        ("[server]\nport = 70000\n" + BASE, "server.port"),
        ("[server]\nprot = 1\n" + BASE, "server.prot: unknown key"),
        ("[usage]\nbatch_max = 0\n" + BASE, "usage.batch_max"),
        (BASE.replace('kind = "openai"', 'kind = "nope"'), "upstreams[0].kind"),
        (BASE.replace("http://127.0.0.1:1/v1", "ftp://x"), "upstreams[0].base_url"),
        (BASE.replace('routes = [{ upstream = "u" }]', 'routes = [{ upstream = "v" }]'),
         "models[0].routes[0].upstream"),
        (BASE.replace('routes = [{ upstream = "u" }]', "routes = []"), "models[0].routes"),
        (BASE.replace('routes = [{ upstream = "u" }]', 'routes = [{ upstream = "u", weight = -1 }]'),
         "models[0].routes[0].weight"),
        (BASE + '[[upstreams]]\nname = "u"\nkind = "openai"\nbase_url = "http://x"\n', "upstreams[1].name"),
        (BASE + 'api_key_env = "NOT_SET_ANYWHERE_123"\n', "models[0].api_key_env: unknown key"),
        (BASE.replace('base_url = "http://127.0.0.1:1/v1"', 'base_url = "http://x"\napi_key_env = "NOT_SET_123"'),
         "upstreams[0].api_key_env: environment variable NOT_SET_123 is not set"),
        ('[[groups]]\nname = "vip"\n' + BASE, "groups: a group named 'default' is required"),
        ("[server\n", "invalid TOML"),
    ],
)
def test_bad_config_names_the_field(tmp_path: Path, toml: str, field: str) -> None:
    path = tmp_path / "bad.toml"
    path.write_text(toml)
    with pytest.raises(ConfigError) as e:
        load_config(path, env={})
    assert field in str(e.value)


def test_every_missing_secret_is_named_at_once_and_optional_for_database_commands(tmp_path: Path) -> None:
    path = tmp_path / "c.toml"
    path.write_text((ROOT / "config.example.toml").read_text())
    with pytest.raises(ConfigError) as e:
        load_config(path, env={"OPENAI_API_KEY": "sk-x"})
    for name in ("ANTHROPIC_API_KEY", "ARK_API_KEY", "VOLC_ACCESS_KEY", "VOLC_SECRET_KEY"):
        assert f"environment variable {name} is not set" in str(e.value)
    assert "OPENAI_API_KEY" not in str(e.value)
    cfg = load_config(path, env={"OPENAI_API_KEY": "sk-x"}, secrets=False)
    assert cfg.upstream("openai").api_key == "sk-x" and cfg.upstream("ark").api_key is None
