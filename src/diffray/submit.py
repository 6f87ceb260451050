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
import os
import shlex
import sys
from pathlib import Path
from typing import TextIO
from urllib.parse import urlparse

from diffray.errors import ConfigError, DiffrayError
from diffray.storage import is_uri

DEFAULT_ADDRESS = "http://127.0.0.1:8265"
# Never uploaded with the working dir (Ray also honours .gitignore and .rayignore there).
DEFAULT_EXCLUDES = [".git", ".venv", ".cache", "runs", "outputs", "__pycache__", "*.pyc", ".pytest_cache"]
JOB_ENV = {"PYTHONUNBUFFERED": "1"}  # logs reach `tail_job_logs` as they are written
LOOPBACK = {"127.0.0.1", "localhost", "::1"}


class JobFailed(DiffrayError):
    """The submitted job ended FAILED or STOPPED."""


def job_server_address(address: str | None) -> str:
    """The job server URL: `address`, else $RAY_API_SERVER_ADDRESS, else the local default; a bare
    host:port gets http://."""
    address = address or os.environ.get("RAY_API_SERVER_ADDRESS") or DEFAULT_ADDRESS
    return address if is_uri(address) else f"http://{address}"


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


def entrypoint(args: list[str]) -> str:
    """The job's shell command: `diffray` with the arguments quoted."""
    if not args:
        raise ConfigError("nothing to submit: give a diffray command after --, e.g. "
                          "`diffray submit -- train configs/lora.yaml`")
    return shlex.join(["diffray", *args])


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


def precheck(args: list[str], working_dir: Path, err: TextIO) -> None:
    """Validate a `train` or `tune` job's config here, before anything is uploaded, and warn when its runs
    would land in the job's temporary working dir on the cluster.

    Raises:
        ConfigError: the config file is missing or invalid (as `diffray train` would say).
    """
    args = command_of(args)
    if len(args) < 2 or args[0] not in ("train", "tune") or args[1].startswith("-") or args[1] == "results":
        return
    from diffray.methods import load_config
    from diffray.tune.config import load_tune_job

    path = Path(args[1]) if Path(args[1]).is_absolute() else working_dir / args[1]
    if not path.is_file():
        raise ConfigError(f"{args[1]}: no such config under the working dir {working_dir}")
    overrides = [a for a in args[2:] if not a.startswith("-")]
    cfg = load_config(path, overrides) if args[0] == "train" else load_tune_job(path, overrides).train
    storage = cfg.run.storage_path
    if not is_uri(storage) and not Path(storage).expanduser().is_absolute():
        print(f"diffray: warning: run.storage_path={storage} is relative: on the cluster it lands in the job's "
              "temporary working dir; pass --storage-path (shared storage, e.g. s3://bucket/runs)", file=err)


def runtime_env(working_dir: Path, env_vars: dict[str, str], excludes: list[str]) -> dict:
    """The job's runtime environment: the uploaded working dir and its environment variables."""
    if not working_dir.is_dir():
        raise ConfigError(f"--working-dir {working_dir}: not a directory")
    return {"working_dir": str(working_dir), "excludes": [*DEFAULT_EXCLUDES, *excludes],
            "env_vars": {**JOB_ENV, **env_vars}}


def parse_env(pairs: list[str]) -> dict[str, str]:
    """`KEY=VALUE` strings -> a dict (ConfigError naming a malformed one)."""
    out = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise ConfigError(f"--env {pair!r}: expected KEY=VALUE")
        out[key] = value
    return out


def job_client(address: str):
    """A JobSubmissionClient for `address`; an unreachable or unauthorised server is one DiffrayError."""
    enable_token_for_loopback(address)
    from ray.exceptions import AuthenticationError
    from ray.job_submission import JobSubmissionClient

    try:
        return JobSubmissionClient(address)
    except AuthenticationError:
        raise DiffrayError(f"the Ray job server at {address} refused the request: token authentication is on; "
                           "set RAY_AUTH_MODE=token and provide the cluster's token (RAY_AUTH_TOKEN, "
                           "RAY_AUTH_TOKEN_PATH or ~/.ray/auth_token; `ray get-auth-token` on the head prints "
                           "it)") from None
    except Exception as exc:  # ConnectionError, requests errors, a bad URL: the same advice applies
        reason = str(exc).strip().splitlines()[0].rstrip(".") if str(exc).strip() else type(exc).__name__
        raise DiffrayError(f"cannot reach the Ray job server at {address} ({reason}); is the cluster up? "
                           "For a cluster started with `ray up cluster.yaml`, run `ray dashboard cluster.yaml` "
                           f"(an SSH tunnel) and use {DEFAULT_ADDRESS}") from None


def follow_logs(client, job_id: str, out: TextIO) -> None:
    """Copy the job's logs to `out` until the job ends."""

    async def tail() -> None:
        async for chunk in client.tail_job_logs(job_id):
            out.write(chunk)
            out.flush()

    asyncio.run(tail())


def submit_job(address: str | None, args: list[str], working_dir: Path, env_vars: dict[str, str],
               excludes: list[str], storage_path: str | None = None, follow: bool = True,
               out: TextIO = sys.stdout, err: TextIO = sys.stderr) -> str:
    """Submit `diffray ARGS` as a Ray job; with `follow`, stream its logs and wait for it to end.

    Returns:
        The submission id (the job succeeded, or was only submitted when `follow` is false).

    Raises:
        ConfigError: bad arguments or an invalid train config (checked before uploading).
        DiffrayError: the job server is unreachable or refuses the token.
        JobFailed: the job ended FAILED or STOPPED (its message included).
    """
    address = job_server_address(address)
    args = with_storage_path(args, storage_path)
    command = entrypoint(args)
    working_dir = working_dir.resolve()
    env = runtime_env(working_dir, env_vars, excludes)
    precheck(args, working_dir, err)
    client = job_client(address)
    job_id = client.submit_job(entrypoint=command, runtime_env=env)
    print(f"diffray: submitted {job_id} to {address}: {command}", file=err, flush=True)
    if not follow:
        return job_id
    try:
        follow_logs(client, job_id, out)
    except KeyboardInterrupt:
        raise DiffrayError(f"stopped following {job_id}; the job keeps running (`ray job logs --follow "
                           f"--address {address} {job_id}`, `ray job stop --address {address} {job_id}`)") from None
    return wait_for_end(client, job_id)


def wait_for_end(client, job_id: str, poll_s: float = 0.5, timeout_s: float = 60.0) -> str:
    """The job's final status once its logs have ended (the status can trail the log stream)."""
    import time

    deadline = time.monotonic() + timeout_s
    info = client.get_job_info(job_id)
    while not info.status.is_terminal() and time.monotonic() < deadline:
        time.sleep(poll_s)
        info = client.get_job_info(job_id)
    if str(info.status) != "SUCCEEDED":
        message = (info.message or "").strip().splitlines()
        raise JobFailed(f"job {job_id} {info.status}" + (f": {message[-1]}" if message else ""))
    return job_id
