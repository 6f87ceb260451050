"""The CLI's terminal: libraries' own chatter stays off it unless verbose; diffray's lines and errors stay."""

import os
import subprocess
import sys

import pytest

SCRIPT = """
import logging
from diffray import logs
logs.configure_cli(False)
import deepspeed  # warns 'Setting accelerator to CPU' while importing, before quiet_libraries can run
logging.getLogger("DeepSpeed").error("a DeepSpeed error")
logging.getLogger("diffray").info("a diffray line")
"""


@pytest.mark.parametrize("verbose", [False, True])
def test_deepspeed_import_warning_only_when_verbose(verbose):
    env = {**os.environ, "DIFFRAY_VERBOSE": "1" if verbose else "0"}
    proc = subprocess.run([sys.executable, "-c", SCRIPT], env=env, capture_output=True, text=True, timeout=300)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out
    assert ("Setting accelerator" in out) is verbose
    assert "a DeepSpeed error" in out and "a diffray line" in out
