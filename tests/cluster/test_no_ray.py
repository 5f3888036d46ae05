"""Single-host switchd never loads Ray: it is the `cluster` extra's, for the gateway."""

from __future__ import annotations

import subprocess
import sys


def test_switchd_app_and_cli_do_not_import_ray() -> None:
    code = (
        "import sys, switchd.app, switchd.cli, switchd.cluster.gateway, switchd.cluster.commands;"
        "print('ray' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
