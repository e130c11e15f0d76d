"""flows.settings: the worker, the receiver, the service and the explanation Jobs refuse to start while a setting or
a secret handed to them still holds the deploy examples' CHANGE-ME placeholder, naming it (never its value)."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from flows.settings import Settings

ROOT = Path(__file__).resolve().parents[1]


def test_placeholder_secrets_are_refused_by_name(tmp_path, environ):
    environ({"FIGAN_HOME": str(tmp_path), "AWS_ACCESS_KEY_ID": "figan-worker",
             "AWS_SECRET_ACCESS_KEY": "CHANGE-ME-at-least-8-chars", "PREFECT_API_AUTH_STRING": "figan:CHANGE-ME"})
    with pytest.raises(ValueError) as e:
        Settings.load()
    message = str(e.value)
    assert "AWS_SECRET_ACCESS_KEY" in message and "PREFECT_API_AUTH_STRING" in message
    assert "AWS_ACCESS_KEY_ID" not in message
    assert "figan:CHANGE-ME" not in message and "at-least-8-chars" not in message        # names, never values


def test_real_values_and_foreign_variables_pass(tmp_path, environ):
    environ({"FIGAN_HOME": str(tmp_path), "PREFECT_API_AUTH_STRING": "figan:9Zq-real", "EDITOR_HINT": "CHANGE-ME"})
    assert Settings.load().home == tmp_path


def test_a_settings_file_value_is_refused_by_its_setting_name(tmp_path, environ):
    f = tmp_path / "figan.yaml"
    f.write_text("tracking_uri: postgresql+psycopg2://mlflow:CHANGE-ME@postgres:5432/mlflow\n")
    environ({"FIGAN_HOME": str(tmp_path), "FIGAN_SETTINGS": str(f)})
    with pytest.raises(ValueError, match=r"settings: tracking_uri still hold"):
        Settings.load()
    environ({"FIGAN_HOME": str(tmp_path), "FIGAN_TRACKING_URI": "http://CHANGE-ME:5000"})
    with pytest.raises(ValueError, match=r"settings: FIGAN_TRACKING_URI still hold"):
        Settings.load()


def test_the_service_refuses_a_placeholder_api_key(tmp_path, environ):
    from services.store import ServiceConfig

    environ({"FIGAN_HOME": str(tmp_path), "FIGAN_SERVICE_API_KEY": "CHANGE-ME"})
    with pytest.raises(ValueError, match="FIGAN_SERVICE_API_KEY"):
        ServiceConfig.load()
    environ({"FIGAN_HOME": str(tmp_path), "FIGAN_SERVICE_API_KEY": "k3y"})
    assert ServiceConfig.load().api_key == "k3y"


def test_environment_over_file_over_default_and_paths_under_home(tmp_path, environ):
    """One settings object for flows, worker and service: the file's values, the environment's over them, unset
    paths under home."""
    f = tmp_path / "figan.yaml"
    f.write_text("receiver_port: 6001\nservice_port: 6002\nmodel_allowlist: [cnn-a, cnn-b]\nservice_gen_queue: 3\n")
    environ({"FIGAN_HOME": str(tmp_path / "h"), "FIGAN_SETTINGS": str(f), "FIGAN_SERVICE_PORT": "6003",
             "FIGAN_MODELS": "cnn-c"})
    s = Settings.load()
    assert (s.receiver_port, s.service_port, s.model_allowlist, s.service_gen_queue) == (6001, 6003, ("cnn-c",), 3)
    assert (s.data_store, s.work_dir, s.service_cache) == \
        (tmp_path / "h" / "data-store", tmp_path / "h" / "work", tmp_path / "h" / "service-cache")
    assert Settings.load(home=tmp_path / "x").home == tmp_path / "x"                     # a caller's override wins


@pytest.mark.parametrize("env, named", [
    ({"FIGAN_RECEIVER_PORT": "70000"}, "FIGAN_RECEIVER_PORT"),
    ({"FIGAN_MAX_ATTEMPTS": "0"}, "FIGAN_MAX_ATTEMPTS"),
    ({"FIGAN_RECONCILE_SECONDS": "soon"}, "FIGAN_RECONCILE_SECONDS"),
    ({"FIGAN_SERVICE_PUBLIC_READ": "perhaps"}, "FIGAN_SERVICE_PUBLIC_READ"),
    ({"FIGAN_DEVICE": "tpu"}, "FIGAN_DEVICE"),
    ({"FIGAN_PASS_ALIAS": "latest"}, "FIGAN_PASS_ALIAS"),
])
def test_a_bad_value_is_refused_naming_its_variable(tmp_path, environ, env, named):
    environ({"FIGAN_HOME": str(tmp_path), **env})
    with pytest.raises(ValueError, match=rf"settings: {named} \("):
        Settings.load()


def test_an_unknown_key_in_the_settings_file_is_refused(tmp_path, environ):
    f = tmp_path / "figan.yaml"
    f.write_text("recever_port: 6001\n")
    environ({"FIGAN_HOME": str(tmp_path), "FIGAN_SETTINGS": str(f)})
    with pytest.raises(ValueError, match="unknown setting 'recever_port'"):
        Settings.load()


def test_the_worker_refuses_to_start_before_doing_anything(tmp_path):
    """`figan worker` (receiver + reconciler), as its container runs it: exit 2 naming the variable, and nothing
    started or written (no webhook secret, no logs, no home folder)."""
    home = tmp_path / "home"
    env = {**os.environ, "FIGAN_HOME": str(home), "PREFECT_API_AUTH_STRING": "figan:CHANGE-ME",
           "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    r = subprocess.run([sys.executable, "-m", "flows.cli", "worker"], env=env, cwd=ROOT, capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 2, r.stderr[-2000:]
    assert "PREFECT_API_AUTH_STRING" in r.stderr and "CHANGE-ME placeholder" in r.stderr
    assert not home.exists()
