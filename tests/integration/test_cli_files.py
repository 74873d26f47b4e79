"""What the command line says about a file it cannot read, or cannot write into: one line naming the file.

Every command that reads a file runs as a user runs it, with a configured database and model, so that only the
file is wrong; it must end within FAIL_WITHIN seconds, before the database or the model is touched.
"""

import os
import subprocess
import sys
import time

import pytest

FAIL_WITHIN = 10.0  # seconds, process start included

# (command, the one line it must print); prompt.txt exists, the other names do not.
MISSING = {
    "measure --text-file": (["measure", "--text-file", "missing.txt"], "text file missing.txt does not exist"),
    "measure --messages-file": (["measure", "--messages-file", "missing.json"],
                                "messages file missing.json does not exist"),
    "measure --memories-file": (["measure", "--text-file", "prompt.txt", "--memories-file", "missing.json"],
                                "memories file missing.json does not exist"),
    "submit --text-file": (["submit", "--text-file", "missing.txt"], "text file missing.txt does not exist"),
    "submit --messages-file": (["submit", "--messages-file", "missing.json"],
                               "messages file missing.json does not exist"),
    "generate --text-file": (["generate", "--adapter", "1", "--text-file", "missing.txt"],
                             "text file missing.txt does not exist"),
    "generate --messages-file": (["generate", "--adapter", "1", "--messages-file", "missing.json"],
                                 "messages file missing.json does not exist"),
    "measure --text-file a directory": (["measure", "--text-file", "."], "text file . cannot be read: Is a directory"),
    "measure --json into a missing directory": (["measure", "--text-file", "prompt.txt", "--json", "nowhere/out.json"],
                                                "--json nowhere/out.json: the directory {cwd}/nowhere does not exist"),
    "plot --out into a missing directory": (["plot", "1", "--out", "nowhere/run.png"],
                                            "--out nowhere/run.png: the directory {cwd}/nowhere does not exist"),
}


@pytest.mark.parametrize("name", MISSING)
def test_a_file_that_cannot_be_read_or_written_is_one_line_naming_it(tmp_path, database_url, name):
    command, message = MISSING[name]
    (tmp_path / "prompt.txt").write_text("cheese => fromage\nbread =>", encoding="utf-8")
    env = {**os.environ, "ICLD_DATABASE_URL": database_url, "ICLD_DATA_DIR": str(tmp_path / "data"),
           "ICLD_MODEL": "nosuch-org/nosuch-model", "HF_HUB_OFFLINE": "1", "ICLD_LOG_FORMAT": "json"}

    started = time.monotonic()
    result = subprocess.run([sys.executable, "-m", "icldaemon", *command], capture_output=True, text=True,
                            cwd=tmp_path, env=env, timeout=300)
    seconds = time.monotonic() - started

    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert lines == [f"icldaemon: {message.format(cwd=tmp_path)}"], result.stderr
    assert result.returncode == 1 and result.stdout == ""
    assert seconds < FAIL_WITHIN
