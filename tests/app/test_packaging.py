"""The wheel as users get it, built from this checkout and installed into fresh virtual environments:
`raygrpo[client]` brings no Ray or torch and its SDK imports; the wheel carries Alembic's files, so
`raygrpo db upgrade` migrates a fresh SQLite file and a fresh PostgreSQL database from it.

Installing the whole `api` extra in a fresh environment would download Ray and torch again (gigabytes):
the second environment gets the wheel alone and borrows the server's dependencies from the test's own
environment through a path entry, so what is tested is the wheel's own content."""

from __future__ import annotations

import os
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.services


def run(*cmd: str | Path, cwd: Path, env: dict[str, str] | None = None, timeout: float = 600) -> str:
    out = subprocess.run([str(c) for c in cmd], cwd=cwd, capture_output=True, text=True, timeout=timeout,
                         env={**os.environ, "PIP_DISABLE_PIP_VERSION_CHECK": "1", **(env or {})})
    assert out.returncode == 0, f"{cmd}: exit {out.returncode}\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}"
    return out.stdout


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    """Built from a copy of the checkout's files (tracked and not ignored): setuptools keeps a build/ folder
    in the source tree, and modules deleted since an earlier build would otherwise ride along."""
    import shutil

    src, out = tmp_path_factory.mktemp("src"), tmp_path_factory.mktemp("wheel")
    files = run("git", "ls-files", "--cached", "--others", "--exclude-standard", cwd=ROOT).splitlines()
    for name in files:
        if (ROOT / name).is_file():
            (src / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / name, src / name)
    run(sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", out, src, cwd=out)
    (whl,) = out.glob("raygrpo-*.whl")
    return whl


def venv(path: Path) -> Path:
    run(sys.executable, "-m", "venv", path, cwd=path.parent)
    return path / "bin"


def test_the_wheel_carries_the_migrations_and_data(wheel):
    import zipfile

    names = set(zipfile.ZipFile(wheel).namelist())
    for needed in ("app/data/alembic.ini", "app/data/migrations/env.py", "app/data/migrations/script.py.mako",
                   "app/data/migrations/versions/0001_initial.py", "grpo/agents/data/corpus.jsonl",
                   "app/client/cli.py", "grpo/run.py"):
        assert needed in names, needed
    assert not [n for n in names if n.startswith("tests/")]


def test_the_client_extra_installs_no_ray_or_torch_and_the_sdk_imports(wheel, tmp_path):
    bin_ = venv(tmp_path / "client")
    run(bin_ / "pip", "install", "-q", f"{wheel}[client]", cwd=tmp_path)
    installed = run(bin_ / "pip", "list", "--format=freeze", cwd=tmp_path).lower()
    names = {line.split("==")[0] for line in installed.split()}
    assert {"httpx", "pydantic", "typer", "rich", "raygrpo"} <= names
    assert not names & {"ray", "torch", "transformers", "sqlalchemy", "sqlmodel", "fastapi", "redis"}, names
    code = "from app.client import Client, NotFound; c = Client('http://127.0.0.1:9'); print(c.url)"
    assert run(bin_ / "python", "-c", code, cwd=tmp_path).strip() == "http://127.0.0.1:9/api/v1/jsonrpc"
    assert "submit" in run(bin_ / "raygrpo", "--help", cwd=tmp_path)
    # a server-side command names the extra it needs instead of failing on an import
    up = subprocess.run([bin_ / "raygrpo", "--home", tmp_path / "h", "up"], capture_output=True, text=True,
                        cwd=tmp_path, timeout=120)
    assert up.returncode == 2 and "pip install 'raygrpo[api]'" in up.stderr, up.stderr


def test_the_client_runs_on_its_dependency_floors(wheel, tmp_path):
    """pyproject's floors of the bare install, installed exactly (`>=` read as `==`): the SDK's unit tests
    pass and the CLI starts. A floor below what the code calls fails here."""
    import tomllib

    floors = [d.split(";")[0].split("#")[0].strip().replace(">=", "==")
              for d in tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]]
    assert all("==" in f for f in floors), floors
    bin_ = venv(tmp_path / "floors")
    run(bin_ / "pip", "install", "-q", *floors, "pytest", cwd=tmp_path)
    run(bin_ / "pip", "install", "-q", "--no-deps", wheel, cwd=tmp_path)
    (tmp_path / "t").mkdir()
    test = tmp_path / "t" / "test_client.py"
    test.write_text((ROOT / "tests" / "app" / "test_client.py").read_text())
    assert " passed" in run(bin_ / "python", "-m", "pytest", "-q", "-p", "no:cacheprovider", test, cwd=tmp_path / "t")
    assert "submit" in run(bin_ / "raygrpo", "--help", cwd=tmp_path)


def test_db_upgrade_from_the_wheel_on_fresh_sqlite_and_postgresql(wheel, tmp_path):
    from raygrpo_test_services import fresh_postgres
    from sqlalchemy import create_engine, inspect, text

    bin_ = venv(tmp_path / "api")
    run(bin_ / "pip", "install", "-q", "--no-deps", wheel, cwd=tmp_path)
    site = Path(run(bin_ / "python", "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])",
                    cwd=tmp_path).strip())
    # the server's dependencies from this environment; the wheel's own `app` comes first (site-packages)
    (site / "zz_dev_dependencies.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    where = run(bin_ / "python", "-c", "import app, os; print(os.path.dirname(app.__file__))", cwd=tmp_path)
    assert where.strip().startswith(str(site)), where

    from alembic.script import ScriptDirectory

    from app.data.db import alembic_config

    newest = ScriptDirectory.from_config(alembic_config()).get_current_head()
    sqlite_url = f"sqlite:///{tmp_path / 'fresh.db'}"
    with fresh_postgres() as pg_url:
        for url in (sqlite_url, pg_url):
            run(bin_ / "raygrpo", "--home", tmp_path / "h", "db", "upgrade", "--url", url, cwd=tmp_path)
            engine = create_engine(url)
            try:
                with engine.connect() as conn:
                    head = conn.execute(text("select version_num from alembic_version")).scalar_one()
                    tables = set(inspect(conn).get_table_names())
            finally:
                engine.dispose()
            assert head == newest and {"training_jobs", "trajectories", "experiments"} <= tables, (url, tables)
