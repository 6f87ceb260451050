"""Where the exposure rule (no API key on a non-loopback host: refuse) gets its host: the running Serve
instance's own record of what its HTTP proxies bind. This is the one place that asks; the app builder and
every Ingress replica call `enforce`, so neither a config field nor an environment variable seen only by
the driver can make the check look at a different host or at keys the replica will not have.
"""

from __future__ import annotations

import logging

from diffray.serve.config import ServeArgs, check_exposure

log = logging.getLogger(__name__)


def proxy_host() -> str | None:
    """The host the running Serve instance's HTTP proxies bind; None when it cannot be asked."""
    try:
        from ray.serve.context import _get_global_client

        return _get_global_client().get_serve_details()["http_options"]["host"]
    except Exception as exc:  # noqa: BLE001 - no Serve instance reachable from here: unknown counts as exposed
        log.warning("cannot read the Serve HTTP host: %s", exc)
        return None


def enforce(args: ServeArgs) -> None:
    """`check_exposure` against the host Serve really binds, with the keys this process sees.

    Raises:
        ConfigError: naming `auth.api_keys`.
    """
    if args.api_keys() or args.auth.allow_unauthenticated:
        return  # no need to ask Serve
    check_exposure(args, proxy_host())
