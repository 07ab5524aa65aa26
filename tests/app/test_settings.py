"""Settings from the environment: the variable names operators use, `_FILE` secrets, and errors that name
the variable (the process must not start on a typo, nor print a secret)."""

from __future__ import annotations

from pathlib import Path

import pytest

from app.settings import DEFAULT_RATE_LIMITS, Settings, SettingsError

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def env(monkeypatch):
    for name in ("DATABASE_URL", "REDIS_URL", "RAY_DASHBOARD_URL", "RAYGRPO_HOME", "RAYGRPO_RATE_LIMITS",
                 "RAYGRPO_JWT_SECRET", "RAYGRPO_JWT_SECRET_FILE", "RAYGRPO_API_PORT", "RAYGRPO_WEBHOOK_URLS"):
        monkeypatch.delenv(name, raising=False)
    return monkeypatch


def test_defaults_and_the_sqlite_file_under_home(env, tmp_path):
    env.setenv("RAYGRPO_HOME", str(tmp_path / "h"))
    s = Settings()
    assert s.home == (tmp_path / "h").resolve()
    assert s.db_url == f"sqlite:///{tmp_path / 'h' / 'raygrpo.db'}"
    assert s.redis_url is None and s.api_port == 8001 and s.rate_limits == DEFAULT_RATE_LIMITS


def test_unprefixed_variables_and_typed_values(env):
    env.setenv("DATABASE_URL", "postgresql://u:pw@db/x")
    env.setenv("REDIS_URL", "redis://r:6379/0")
    env.setenv("RAYGRPO_API_PORT", "9000")
    env.setenv("RAYGRPO_WEBHOOK_URLS", "http://a/hook, ,http://b/hook")
    env.setenv("RAYGRPO_RATE_LIMITS", "training.cancel=3,default=0")
    s = Settings()
    assert (s.database_url, s.redis_url, s.api_port) == ("postgresql://u:pw@db/x", "redis://r:6379/0", 9000)
    assert s.webhook_urls == ["http://a/hook", "http://b/hook"]
    assert s.rate_limits == DEFAULT_RATE_LIMITS | {"training.cancel": 3, "default": 0}
    assert "pw" not in repr(s)  # the URL carries the password


def test_arguments_win_over_the_environment(env, tmp_path):
    env.setenv("DATABASE_URL", "postgresql://elsewhere/x")
    s = Settings(home=tmp_path, database_url=None, rate_limits={"default": 0})
    assert s.database_url is None and s.rate_limits == {"default": 0}


def test_a_secret_from_its_file_and_the_variable_first(env, tmp_path):
    (tmp_path / "secret").write_text("from-the-file-" + "f" * 32 + "\n")
    env.setenv("RAYGRPO_JWT_SECRET_FILE", str(tmp_path / "secret"))
    assert Settings().jwt_secret == "from-the-file-" + "f" * 32
    env.setenv("RAYGRPO_JWT_SECRET", "from-the-variable-" + "v" * 32)
    assert Settings().jwt_secret == "from-the-variable-" + "v" * 32
    assert "from-the" not in repr(Settings())


def test_an_empty_variable_is_unset(env):
    env.setenv("REDIS_URL", "")
    assert Settings().redis_url is None


@pytest.mark.parametrize(("name", "value", "message"), [
    ("RAYGRPO_API_PORT", "abc", "invalid setting RAYGRPO_API_PORT: Input should be a valid integer"),
    ("RAYGRPO_API_PORT", "70000", "invalid setting RAYGRPO_API_PORT: Input should be less than or equal to 65535"),
    ("RAYGRPO_RATE_LIMITS", "training.cancel", "invalid setting RAYGRPO_RATE_LIMITS: Value error, 'training.cancel'"),
    ("RAYGRPO_AUTH", "maybe", "invalid setting RAYGRPO_AUTH: Input should be 'on' or 'off'"),
])
def test_a_bad_value_names_its_variable(env, name, value, message):
    env.setenv(name, value)
    with pytest.raises(SettingsError) as e:
        Settings()
    assert str(e.value).startswith(message)


def test_an_unreadable_secret_file_names_the_variable(env, tmp_path):
    env.setenv("RAYGRPO_JWT_SECRET_FILE", str(tmp_path / "missing"))
    with pytest.raises(SettingsError, match="RAYGRPO_JWT_SECRET_FILE: cannot read"):
        Settings()


def test_a_short_or_placeholder_signing_key_stops_the_server_starting(env, tmp_path):
    import yaml

    shipped = next(d for d in yaml.safe_load_all((ROOT / "kuberay" / "secrets.yaml").read_text())
                   if d["metadata"]["name"] == "raygrpo-api")["stringData"]
    env.setenv("RAYGRPO_JWT_SECRET", shipped["jwt-secret"])
    with pytest.raises(SettingsError, match="RAYGRPO_JWT_SECRET: .*shipped placeholder"):
        Settings()
    env.setenv("RAYGRPO_JWT_SECRET", "x" * 31)
    with pytest.raises(SettingsError, match="RAYGRPO_JWT_SECRET: .*31 bytes; an HS256 key needs at least 32"):
        Settings()
    env.setenv("RAYGRPO_JWT_SECRET", "x" * 32)
    assert Settings().jwt_secret == "x" * 32
    env.delenv("RAYGRPO_JWT_SECRET")
    env.setenv("RAYGRPO_WEBHOOK_SECRET", shipped["webhook-secret"])
    with pytest.raises(SettingsError, match="RAYGRPO_WEBHOOK_SECRET: .*placeholder"):
        Settings()
