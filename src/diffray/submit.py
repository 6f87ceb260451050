"""`diffray submit`: run a `diffray` command on a running Ray cluster as a Ray job and follow its logs.

The job's entrypoint is `diffray ARGS...`; the working directory (configs, data lists) is uploaded as
the job's `working_dir` and is its cwd on the cluster, so `configs/lora.yaml` resolves there. The
`diffray` package itself must already be installed on the cluster's nodes (cluster.yaml's setup
commands do it). This module talks to the job server over HTTP only: it never joins the cluster,
never opens ports and never imports torch.

Token authentication: Ray sends the cluster token (RAY_AUTH_TOKEN, RAY_AUTH_TOKEN_PATH or
~/.ray/auth_token) when RAY_AUTH_MODE=token. For a loopback address (a local cluster, or a remote one
reached through `ray dashboard cluster.yaml`'s SSH tunnel) a locally available token is sent without
that variable, as `ray start` does; a token is never sent in clear to a remote host unless asked for.
"""

from __future__ import annotations

import asyncio
import logging
import os
import re
import shlex
import sys
import time
from pathlib import Path
from typing import TextIO
from urllib.parse import urlparse

from diffray.errors import ConfigError, DiffrayError, hidden_credentials
from diffray.storage import is_uri

DEFAULT_ADDRESS = "http://127.0.0.1:8265"
# Never uploaded with the working dir (Ray also honours .gitignore and .rayignore there): diffray's own output
# folders among them (the serving feedback store holds people's prompts and images; URI runs log to runs-logs),
# and dotenv files, which hold secrets (a job gets its variables from --env, on the cluster only).
SECRET_FILES = [".env", ".env.*"]
DEFAULT_EXCLUDES = [".git", ".venv", ".cache", "runs", "outputs", "__pycache__", "*.pyc", ".pytest_cache",
                    "/feedback/", "/runs-logs/", *SECRET_FILES]
JOB_ENV = {"PYTHONUNBUFFERED": "1"}  # logs reach `tail_job_logs` as they are written
LOOPBACK = {"127.0.0.1", "localhost", "::1"}
ADDRESS_ENV = ("RAY_API_SERVER_ADDRESS", "RAY_ADDRESS")  # read by `job_server_address` only
ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")  # a variable a shell can set and read


class JobFailed(DiffrayError):
    """The submitted job ended FAILED or STOPPED."""


def job_server_address(address: str | None) -> str:
    """The job server URL: `address`, else $RAY_API_SERVER_ADDRESS, else $RAY_ADDRESS when it is an http(s)
    URL (as `ray job submit` reads them; a bare RAY_ADDRESS is a GCS address), else the local default; a bare
    host:port gets http://."""
    from diffray.cluster import is_job_server_url

    ray_address = os.environ.get("RAY_ADDRESS", "")
    http_ray_address = ray_address if is_job_server_url(ray_address) else None
    source = ("--address" if address else "RAY_API_SERVER_ADDRESS" if os.environ.get("RAY_API_SERVER_ADDRESS")
              else "RAY_ADDRESS" if http_ray_address else "the default address")
    address = address or os.environ.get("RAY_API_SERVER_ADDRESS") or http_ray_address or DEFAULT_ADDRESS
    address = address if is_uri(address) else f"http://{address}"
    check_address(address, source)
    return address


def check_address(address: str, source: str) -> None:
    """Refuse an http(s) address that is no URL (Ray's client raised a bare ValueError, or 'cannot reach' for a
    port out of range) and a Ray Client address (ray://, the cluster's, not its job server's).

    Raises:
        ConfigError: naming `source` (the option or variable) and the address, credentials hidden.
    """
    scheme, where = address.split("://")[0].lower(), f"{source} {hidden_credentials(address)}"
    try:
        parsed = urlparse(address)
        host, _ = parsed.hostname, parsed.port  # each raises ValueError on a malformed netloc or port
    except ValueError as exc:
        raise ConfigError(f"{where}: not a URL ({exc}); expected http://HOST:PORT") from None
    if scheme == "ray":
        raise ConfigError(f"{where}: a Ray Client address; give the job server's (dashboard's) URL, e.g. "
                          "http://HOST:8265")
    if scheme in ("http", "https") and not host:
        raise ConfigError(f"{where}: no host; expected http://HOST:PORT")


def token_available() -> bool:
    """Whether a Ray auth token can be found where Ray looks for one."""
    if os.environ.get("RAY_AUTH_TOKEN"):
        return True
    path = os.environ.get("RAY_AUTH_TOKEN_PATH") or str(Path.home() / ".ray" / "auth_token")
    return Path(path).expanduser().is_file()


def enable_token_for_loopback(address: str) -> None:
    """Turn on Ray's client-side token auth for a loopback address when a token exists and the user
    has not chosen a mode. Must run before `ray` is imported (Ray reads the mode once)."""
    if "RAY_AUTH_MODE" not in os.environ and urlparse(address).hostname in LOOPBACK and token_available():
        os.environ["RAY_AUTH_MODE"] = "token"


def entrypoint(args: list[str], diffray=None) -> str:
    """The job's shell command: `diffray` with the arguments quoted; with `diffray`, the CLI's click group, a
    command or option it lacks is refused (`check_command`)."""
    if not args or not command_of(args):
        raise ConfigError("nothing to submit: give a diffray command after --, e.g. "
                          "`diffray submit -- train configs/lora.yaml`")
    if diffray is not None:
        check_command(args, diffray)
    return shlex.join(["diffray", *args])


def check_command(args: list[str], diffray) -> None:
    """Refuse, before the upload, a command or leading option that `diffray` (the CLI's click group, passed in:
    this module must not import the CLI) would reject: the job failed on the cluster with a usage error
    (`-- python x.py`, `-- trian x.yaml`).

    Raises:
        ConfigError: naming the command or option and the ones diffray has.
    """
    cmd = command_of(args)
    options = {opt for param in diffray.params for opt in param.opts} | {"--help"}
    if unknown := [a for a in args[:len(args) - len(cmd)] if a not in options]:
        raise ConfigError(f"{unknown[0]}: not an option of diffray (before the command: {', '.join(sorted(options))})")
    if cmd[0] not in diffray.commands:
        raise ConfigError(f"{cmd[0]}: not a diffray command; `diffray submit -- COMMAND` runs `diffray COMMAND` "
                          f"on the cluster, one of: {', '.join(sorted(diffray.commands))}")


def command_of(args: list[str]) -> list[str]:
    """The command and its arguments, after `diffray`'s own options (`-v train x.yaml` -> `train x.yaml`)."""
    i = 0
    while i < len(args) and args[i].startswith("-"):
        i += 1
    return list(args[i:])


def with_storage_path(args: list[str], storage_path: str | None) -> list[str]:
    """`args` with `run.storage_path=storage_path` added to a `train` or `tune` command that does not set it."""
    cmd = command_of(args)
    if (not storage_path or len(cmd) < 2 or cmd[0] not in ("train", "tune") or cmd[1] == "results"
            or any(a.startswith("run.storage_path=") for a in cmd)):
        return list(args)
    return [*args, f"run.storage_path={storage_path}"]


def job_config(args: list[str]) -> str | None:
    """The config file of a `train` or `tune` job (`tune results DIR` has none)."""
    cmd = command_of(args)
    if len(cmd) < 2 or cmd[0] not in ("train", "tune") or cmd[1].startswith("-") or cmd[1] == "results":
        return None
    return cmd[1]


def on_cluster_only(config: str) -> bool:
    """An absolute config path that does not exist here: one in the cluster's image (`/app/configs/x.yaml`),
    which the job reads there and nothing uploads."""
    return Path(config).is_absolute() and not Path(config).exists()


def secret_files(working_dir: Path) -> list[str]:
    """The dotenv files at the top of the working dir, which the upload leaves out (`SECRET_FILES`)."""
    return sorted(p.name for pattern in SECRET_FILES for p in working_dir.glob(pattern))


def precheck(args: list[str], working_dir: Path, err: TextIO) -> None:
    """Validate a `train` or `tune` job's config here, before anything is uploaded, and warn about its local
    paths that the cluster's nodes may not see (`local_path_warnings`).

    Raises:
        ConfigError: the config file is missing or invalid (as `diffray train` would say).
    """
    config = job_config(args)
    if config is None:
        return
    from diffray.methods import load_config
    from diffray.tune.config import load_tune_job

    args = command_of(args)
    if on_cluster_only(config):
        print(f"diffray: warning: {config} is not on this machine: the job reads it from the cluster's nodes (an "
              "image path), so it is not checked here", file=err)
        return
    path = Path(config) if Path(config).is_absolute() else working_dir / config
    if not path.is_file():
        raise ConfigError(f"{config}: no such config under the working dir {working_dir}")
    overrides = [a for a in args[2:] if not a.startswith("-")]
    cfg = load_config(path, overrides) if args[0] == "train" else load_tune_job(path, overrides).train
    for line in local_path_warnings(cfg.run.storage_path, cfg.data.path, cfg.model.path):
        print(f"diffray: warning: {line}", file=err)


def local_path_warnings(storage: str, data: str, model: str) -> list[str]:
    """One line per local path of the job that the cluster's nodes may not see (an absolute one inside the working
    dir too: the nodes unpack the upload elsewhere); none for URIs, hub ids, `builtin:` or relative data/model paths."""
    relative = not is_uri(storage) and not Path(storage).expanduser().is_absolute()
    lines = [f"run.storage_path={storage} is relative: on the cluster it lands in the job's temporary working dir; "
             "pass --storage-path (shared storage, e.g. s3://bucket/runs)"] if relative else []
    if not is_uri(storage) and not relative:  # with several nodes, each writes its checkpoints to its own disk
        lines.append(f"run.storage_path={storage} is a local path: every node of the cluster must see it (a shared "
                     "filesystem); else pass --storage-path (object storage, e.g. s3://bucket/runs)")
    for field, path in (("data.path", data), ("model.path", model)):
        if not is_uri(path) and Path(path).expanduser().is_absolute():
            lines.append(f"{field}={path} is an absolute local path: the job reads it on the cluster's nodes, not "
                         "from the upload; every node must see it (a shared filesystem), else use object storage "
                         "(s3://...) or a path relative to the working dir")
    return lines


def runtime_env(working_dir: Path, env_vars: dict[str, str], excludes: list[str]) -> dict:
    """The job's runtime environment: the uploaded working dir and its environment variables."""
    if not working_dir.is_dir():
        raise ConfigError(f"--working-dir {working_dir}: not a directory")
    return {"working_dir": str(working_dir), "excludes": [*DEFAULT_EXCLUDES, *excludes],
            "env_vars": {**JOB_ENV, **env_vars}}


def upload_limit() -> int:
    """The most bytes the job server takes in one upload (100 MiB in Ray 2.60)."""
    try:
        from ray._private.ray_constants import DASHBOARD_CLIENT_MAX_SIZE
        from ray._private.runtime_env.packaging import GCS_STORAGE_MAX_SIZE
        return min(DASHBOARD_CLIENT_MAX_SIZE, GCS_STORAGE_MAX_SIZE)
    except ImportError:
        return 100 * 2**20  # Ray 2.60's


def upload_files(working_dir: Path, excludes: list[str], limit: int | None = None) -> dict[str, int] | None:
    """The files Ray's zip of the working dir will hold (its own walk: the runtime env's `excludes`, .gitignore
    unless RAY_RUNTIME_ENV_IGNORE_GITIGNORE=1, .rayignore), by path relative to it, each with its bytes in the
    zip (Ray stores files uncompressed: the size plus the headers), until they reach `limit` (`upload_limit()`).
    None when this Ray has no such walk (a private API: the checks that need it are skipped, Ray's errors stand)."""
    try:
        from ray._private.runtime_env.packaging import _dir_travel, _get_excludes
    except ImportError:
        return None
    files: dict[str, int] = {}
    total, limit = 0, upload_limit() if limit is None else limit

    def add(path: Path) -> None:
        nonlocal total
        if path.is_file():
            name = path.relative_to(working_dir).as_posix()
            files[name] = path.stat().st_size + 76 + 2 * len(name)
            total += files[name]

    quiet = logging.getLogger(f"{__name__}.upload")  # Ray logs each ignore file it reads again when it zips
    quiet.setLevel(logging.WARNING)
    try:  # the first exclude skips the rest of the walk once over the limit: counting all of /usr took minutes
        _dir_travel(working_dir, [lambda _: total >= limit, _get_excludes(working_dir, excludes)], add, logger=quiet,
                    include_gitignore=os.environ.get("RAY_RUNTIME_ENV_IGNORE_GITIGNORE", "0") != "1")
    except TypeError:  # another signature in another Ray release
        return None
    return files


def check_upload(args: list[str], working_dir: Path, excludes: list[str]) -> None:
    """Refuse an upload the job would fail on: a `train`/`tune` config it leaves out (outside the working dir, or
    excluded), or a dir over `upload_limit()` (the job server answers a bare 413 after it was all zipped and sent).

    Raises:
        ConfigError: naming the config and why it is left out, or the size, the limit and the largest entries.
    """
    files = upload_files(working_dir, excludes, limit := upload_limit())
    if files is None:
        return
    config, counted = job_config(args), sum(files.values())  # counted < limit: the walk saw every file
    # as written (a symlinked dir inside is zipped as it is named), or resolved
    if config is not None and not on_cluster_only(config):
        names = {os.path.relpath(f(working_dir / config), working_dir) for f in (os.path.normpath, os.path.realpath)}
        inside = [Path(n).as_posix() for n in names if n != ".." and not n.startswith(f"..{os.sep}")]
        if not inside:
            raise ConfigError(f"{config}: outside the working dir {working_dir}, so the job would not find it on "
                              "the cluster; move it under the working dir or pass --working-dir")
        if counted < limit and not any(name in files for name in inside):
            raise ConfigError(f"{config}: left out of the upload (.gitignore, .rayignore or --exclude), so the job "
                              "would not find it on the cluster")
    if counted < limit:
        return
    sizes: dict[str, int] = {}
    for name, size in files.items():
        sizes[name.split("/")[0]] = sizes.get(name.split("/")[0], 0) + size
    top = sorted(sizes.items(), key=lambda kv: -kv[1])[:3]
    largest = ", ".join(f"{name} ({size / 2**20:.0f} MiB)" for name, size in
                        [kv for kv in top if kv[1] >= 2**20] or top)
    raise ConfigError(f"--working-dir {working_dir}: at least {counted / 2**20:.0f} MiB to upload, over "
                      f"the Ray job server's limit of {limit / 2**20:.0f} MiB; largest counted: {largest}. Leave them "
                      "out with --exclude PATTERN or a .rayignore line (data and models belong on storage every node "
                      "reads, e.g. s3://...)")


def parse_env(pairs: list[str]) -> dict[str, str]:
    """`KEY=VALUE` strings -> a dict.

    Raises:
        ConfigError: naming a malformed pair, a key that is no variable name or one given twice; never a value
            (a secret), nor a pair without `=` unless it is a bare name.
    """
    out = {}
    for number, pair in enumerate(pairs, 1):
        key, sep, value = pair.partition("=")
        if not sep and ENV_NAME.fullmatch(pair):
            raise ConfigError(f"--env {pair!r}: expected KEY=VALUE")
        if not sep or not key:
            raise ConfigError(f"--env number {number}: expected KEY=VALUE (" + ("no '='" if not sep else "no key")
                              + "; the value is not shown here: it may be a secret)")
        if not ENV_NAME.fullmatch(key):
            raise ConfigError(f"--env {key!r}=...: not a variable name (letters, digits and _, not starting with "
                              "a digit)")
        if key in out:
            raise ConfigError(f"--env {key}: given twice; give each variable once")
        out[key] = value
    return out


def job_client(address: str):
    """A JobSubmissionClient for `address`; an unreachable or unauthorised server is one DiffrayError."""
    enable_token_for_loopback(address)
    from ray.exceptions import AuthenticationError
    from ray.job_submission import JobSubmissionClient

    # Ray lets RAY_API_SERVER_ADDRESS / RAY_ADDRESS override the address it is given: the job (and the token,
    # sent only to a loopback `address`) would go to another server than the one named here.
    saved = {k: os.environ.pop(k) for k in ADDRESS_ENV if k in os.environ}
    try:
        return JobSubmissionClient(address)
    except AuthenticationError:
        raise DiffrayError(f"the Ray job server at {hidden_credentials(address)} refused the request: token "
                           "authentication is on; set RAY_AUTH_MODE=token and provide the cluster's token "
                           "(RAY_AUTH_TOKEN, RAY_AUTH_TOKEN_PATH or ~/.ray/auth_token; `ray get-auth-token` on the "
                           "head prints it)") from None
    except Exception as exc:  # ConnectionError, requests errors, a bad URL: the same advice applies
        reason = str(exc).strip().splitlines()[0].rstrip(".") if str(exc).strip() else type(exc).__name__
        raise DiffrayError(f"cannot reach the Ray job server at {hidden_credentials(address)} "
                           f"({hidden_credentials(reason)}); is the cluster up? For a cluster started with `ray up "
                           f"cluster.yaml`, run `ray dashboard cluster.yaml` (an SSH tunnel) and use {DEFAULT_ADDRESS}"
                           ) from None
    finally:
        os.environ.update(saved)


def follow_logs(client, job_id: str, out: TextIO) -> None:
    """Copy the job's logs to `out` until the job ends."""

    async def tail() -> None:
        async for chunk in client.tail_job_logs(job_id):
            out.write(chunk)
            out.flush()

    asyncio.run(tail())


def submit_job(address: str | None, args: list[str], working_dir: Path, env_vars: dict[str, str],
               excludes: list[str], storage_path: str | None = None, follow: bool = True,
               out: TextIO | None = None, err: TextIO | None = None, diffray=None) -> str:
    """Submit `diffray ARGS` as a Ray job; with `follow`, stream its logs and wait for it to end. With `diffray`,
    the CLI's click group, the command is checked against it before anything is uploaded.

    Returns:
        The submission id (the job succeeded, or was only submitted when `follow` is false).

    Raises:
        ConfigError: bad arguments, an invalid train config, a config the upload leaves out or a working dir
            too large to upload (checked before uploading).
        DiffrayError: the job server is unreachable or refuses the token.
        JobFailed: the job ended FAILED or STOPPED (its message included).
    """
    out, err = out or sys.stdout, err or sys.stderr  # as they are now (pytest's capture swaps them)
    address = job_server_address(address)
    args = with_storage_path(args, storage_path)
    command = entrypoint(args, diffray)
    working_dir = working_dir.resolve()
    env = runtime_env(working_dir, env_vars, excludes)
    precheck(args, working_dir, err)
    check_upload(args, working_dir, env["excludes"])
    if secrets := secret_files(working_dir):
        print(f"diffray: left out of the upload: {', '.join(secrets)} (secrets stay on this machine; give the job "
              "its variables with --env KEY=VALUE)", file=err, flush=True)
    client = job_client(address)
    job_id = client.submit_job(entrypoint=command, runtime_env=env)
    print(f"diffray: submitted {job_id} to {hidden_credentials(address)}: {command}", file=err, flush=True)
    if not follow:
        return job_id
    try:
        follow_logs(client, job_id, out)
    except KeyboardInterrupt:
        where = hidden_credentials(address)
        raise DiffrayError(f"stopped following {job_id}; the job keeps running (`ray job logs --follow "
                           f"--address {where} {job_id}`, `ray job stop --address {where} {job_id}`)") from None
    return wait_for_end(client, job_id)


def wait_for_end(client, job_id: str, poll_s: float = 0.5, timeout_s: float = 60.0) -> str:
    """The job's final status once its logs have ended (the status can trail the log stream)."""
    deadline = time.monotonic() + timeout_s
    info = client.get_job_info(job_id)
    while not info.status.is_terminal() and time.monotonic() < deadline:
        time.sleep(poll_s)
        info = client.get_job_info(job_id)
    if str(info.status) != "SUCCEEDED":
        message = (info.message or "").strip().splitlines()
        raise JobFailed(f"job {job_id} {info.status}" + (f": {message[-1]}" if message else ""))
    return job_id
