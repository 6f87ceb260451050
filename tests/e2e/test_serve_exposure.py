"""The exposure rule against a real Serve proxy bound to 0.0.0.0: the host checked is the one Serve binds
(asked from Serve, not read from config), and an API key only the driver can see does not let an Ingress
replica start without one. No request ever reaches an app here: every deployment is refused."""

from __future__ import annotations

import pytest
from serve_helpers import app_args, free_port

pytestmark = [pytest.mark.e2e]


@pytest.fixture(scope="module")
def exposed_serve(ray_cluster):
    from ray import serve

    serve.start(http_options={"host": "0.0.0.0", "port": free_port()})
    yield
    serve.shutdown()


def _args(tmp_path) -> dict:
    args = app_args(tmp_path / "adapters", tmp_path / "fb.db", auth={"api_keys": []})
    args["generator"]["num_cpus"] = 0.25
    return args


def test_build_app_asks_serve_for_the_host(exposed_serve, monkeypatch, tmp_path):
    from diffray.errors import ConfigError
    from diffray.serve.app import build_app
    from diffray.serve.exposure import proxy_host

    monkeypatch.delenv("DIFFRAY_API_KEYS", raising=False)
    assert proxy_host() == "0.0.0.0"
    with pytest.raises(ConfigError, match="binds 0.0.0.0") as err:
        build_app(_args(tmp_path))
    assert err.value.field == "auth.api_keys"


def test_a_key_only_the_driver_sees_does_not_start_an_exposed_ingress(exposed_serve, monkeypatch, tmp_path):
    """The cluster's workers were started before this key existed, so replicas do not have it: the
    driver-side check passes, the Ingress replica's own check (with its own keys) refuses to start."""
    from ray import serve

    from diffray.serve.app import build_app

    monkeypatch.setenv("DIFFRAY_API_KEYS", "only-the-driver-has-this")
    app = build_app(_args(tmp_path))  # passes here: this process sees a key
    with pytest.raises(RuntimeError, match="Ingress"):
        serve.run(app, name="exposed", route_prefix="/")
    why = serve.status().applications["exposed"].deployments["Ingress"].message
    assert "binds 0.0.0.0" in why and "auth.api_keys" in why, why  # the replica's own refusal
    serve.delete("exposed")
