"""`diffray submit` given inputs that must fail in one line, before anything is uploaded, without a cluster: the
job server address is 127.0.0.1:9, where nothing listens, so a refusal that comes too late reads 'cannot reach'."""

from __future__ import annotations

import pytest

from testkit.cli import diffray

CLOSED = "http://127.0.0.1:9"


@pytest.fixture(autouse=True)
def no_token(monkeypatch, tmp_path):
    """No RAY_AUTH_MODE set behind the test's back, and no address from the shell."""
    monkeypatch.delenv("RAY_AUTH_TOKEN", raising=False)
    monkeypatch.setenv("RAY_AUTH_TOKEN_PATH", str(tmp_path / "no-token"))
    for name in ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS"):
        monkeypatch.delenv(name, raising=False)


def submit(options, command, monkeypatch, capsys) -> tuple[int, str]:
    return diffray(["submit", "--address", CLOSED, *options, "--", *command], monkeypatch, capsys)


@pytest.mark.parametrize("env, message", [
    (["1BAD=x"], "--env '1BAD'=...: not a variable name"),
    (["HF TOKEN=x"], "--env 'HF TOKEN'=...: not a variable name"),
    (["A=1", "A=2"], "--env A: given twice"),
    (["NOVALUE"], "--env 'NOVALUE': expected KEY=VALUE"),
])
def test_a_malformed_env_is_one_line_naming_the_key(env, message, monkeypatch, capsys):
    """A key no shell can read (a typo, a stray space) or given twice (the last silently won) was submitted."""
    code, out = submit([f"--env={pair}" for pair in env], ["generate", "--prompt", "x"], monkeypatch, capsys)
    assert code == 2 and out.startswith(f"diffray: error: {message}") and len(out.strip().splitlines()) == 1, out


@pytest.mark.parametrize("pair", ["HF_TOKEN:hf_s3cret", "=hf_s3cret", "HF TOKEN=hf_s3cret"])
def test_an_env_value_is_never_echoed_in_an_error(pair, monkeypatch, capsys):
    """`--env HF_TOKEN:hf_...` (':' for '=') put the token into the error line, on the terminal and in CI logs."""
    code, out = submit(["--env", "OK=1", "--env", pair], ["generate", "--prompt", "x"], monkeypatch, capsys)
    assert code == 2 and out.startswith("diffray: error: --env ") and "hf_s3cret" not in out, out


@pytest.mark.parametrize("address, message", [
    ("http://[::1", "--address http://[::1: not a URL"),  # was 'internal error: ValueError: Invalid IPv6 URL'
    ("http://127.0.0.1:99999", "--address http://127.0.0.1:99999: not a URL (Port out of range"),
    ("http://:8265", "--address http://:8265: no host"),
    ("ray://127.0.0.1:10001", "--address ray://127.0.0.1:10001: a Ray Client address"),
])
def test_a_malformed_address_is_one_line_naming_it(address, message, monkeypatch, capsys):
    code, out = diffray(["submit", "--address", address, "--", "generate", "--prompt", "x"], monkeypatch, capsys)
    assert code == 2 and out.startswith(f"diffray: error: {message}") and len(out.strip().splitlines()) == 1, out


def test_a_malformed_address_from_the_environment_names_the_variable(monkeypatch, capsys):
    monkeypatch.setenv("RAY_API_SERVER_ADDRESS", "http://[::1")
    code, out = diffray(["submit", "--", "generate", "--prompt", "x"], monkeypatch, capsys)
    assert code == 2 and out.startswith("diffray: error: RAY_API_SERVER_ADDRESS http://[::1: not a URL"), out


@pytest.mark.parametrize("address, code", [("http://me:hunter2@127.0.0.1:9", 1), ("http://hunter2@127.0.0.1:9", 1),
                                           ("http://me:hunter2@[::1", 2)])
def test_credentials_in_the_address_are_never_printed(address, code, monkeypatch, capsys):
    """Basic auth through a proxy (http://user:password@host) works, but every line naming the server printed the
    password too."""
    got, out = diffray(["submit", "--address", address, "--", "generate", "--prompt", "x"], monkeypatch, capsys)
    assert got == code and "hunter2" not in out and "http://***@" in out, out


@pytest.mark.parametrize("command, name", [
    (["python", "train.py"], "python: not a diffray command"),
    (["trian", "configs/lora.yaml"], "trian: not a diffray command"),
    (["--foo", "train", "configs/lora.yaml"], "--foo: not an option of diffray"),
])
def test_a_command_diffray_lacks_is_refused_before_uploading(command, name, monkeypatch, capsys):
    """The job `diffray python train.py` was uploaded and started, then failed on the cluster with a usage error."""
    code, out = submit([], command, monkeypatch, capsys)
    assert code == 2 and out.startswith(f"diffray: error: {name}") and len(out.strip().splitlines()) == 1, out


@pytest.mark.parametrize("command", [["-v", "generate", "--prompt", "x"], ["tune", "results", "s3://b/runs/x"],
                                     ["data", "--help"]])
def test_diffray_commands_and_options_still_go_to_the_server(command, monkeypatch, capsys):
    code, out = submit([], command, monkeypatch, capsys)
    assert code == 1 and f"cannot reach the Ray job server at {CLOSED}" in out, out


@pytest.mark.parametrize("command", [[], ["-v"], ["--help"]])
def test_nothing_after_the_separator_is_one_line(command, monkeypatch, capsys):
    """Nothing after `--` was typer's boxed usage error; diffray's own one-line message was never reached."""
    code, out = submit([], command, monkeypatch, capsys)
    assert code == 2 and out.strip().startswith("diffray: error: nothing to submit"), out
    assert len(out.strip().splitlines()) == 1, out
