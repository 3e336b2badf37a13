"""`native_stderr_at_debug`: what native code writes to file descriptor 2 during an
ExecuTorch load stays off the terminal by default, is logged at DEBUG, and is logged at
ERROR when the load fails (where the runtime says why)."""

from __future__ import annotations

import logging
import os

import pytest

from flexrank.exporters.executorch.validate import native_stderr_at_debug

LOGGER = "flexrank.exporters.executorch.validate"


def test_native_lines_go_to_debug_not_to_the_terminal(capfd, caplog):
    caplog.set_level(logging.INFO, logger=LOGGER)  # default verbosity: DEBUG is off
    with native_stderr_at_debug():
        os.write(2, b"[cpuinfo_utils.cpp:71] Reading file /sys/devices/soc0/image_version\n")
    assert "cpuinfo_utils" not in capfd.readouterr().err
    assert not [r for r in caplog.records if "cpuinfo_utils" in r.getMessage()]
    os.write(2, b"after the block\n")  # the descriptor is restored
    assert "after the block" in capfd.readouterr().err


def test_a_failed_block_logs_the_native_lines_as_errors(capfd, caplog):
    caplog.set_level(logging.INFO, logger=LOGGER)
    with pytest.raises(RuntimeError, match="0x23"), native_stderr_at_debug():
        os.write(2, b"E program.cpp:102] Program identifier 'XX' != expected 'ET12'\n")
        raise RuntimeError("Failed to load program: error 0x23")
    errors = [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR]
    assert errors == ["native: E program.cpp:102] Program identifier 'XX' != expected 'ET12'"]


def test_with_debug_on_nothing_is_redirected(capfd, caplog):
    caplog.set_level(logging.DEBUG, logger=LOGGER)  # -v
    with native_stderr_at_debug():
        os.write(2, b"seen with -v\n")
    assert "seen with -v" in capfd.readouterr().err
