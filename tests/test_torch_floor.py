"""The torch floor: setup.py, the README and the code agree on it, and an older torch is refused at import.

Safe checkpoint loading needs ``torch.serialization.add_safe_globals`` (torch 2.4) to allow-list fairseq's
config types. setup.py once admitted torch 2.1 while the code skipped the allow-list (and with it the forced
``weights_only=True``) below 2.4 and the README promised safe loading "whatever the torch version": on such a
torch a malicious checkpoint would have been unpickled unrestricted, silently.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _code_floor() -> tuple[int, int]:
    from t2r_fairseq.hardening import fairseq_compat

    return fairseq_compat.MIN_TORCH


def _as_text(version: tuple[int, int]) -> str:
    return ".".join(map(str, version))


def test_setup_py_requires_the_torch_the_code_needs() -> None:
    floors = re.findall(r"""["']torch\s*>=\s*([\d.]+)""", (ROOT / "setup.py").read_text(encoding="utf-8"))
    assert floors == [_as_text(_code_floor())], f"setup.py's torch floor {floors} != MIN_TORCH {_code_floor()}"


def test_readme_states_the_floor_where_it_promises_safe_loading() -> None:
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    promise = _bullet(readme, "checkpoints are only ever read with torch's safe loader")
    floor = _as_text(_code_floor())
    assert re.search(rf"torch (≥|>=) ?{re.escape(floor)}\b", promise), promise
    assert "whatever the torch version" not in " ".join(readme.split())


def _bullet(text: str, start: str) -> str:
    """The README list item that begins with ``start``, its wrapped lines joined."""
    lines = text.splitlines()
    first = next((i for i, l in enumerate(lines) if l.startswith(f"- {start}")), None)
    assert first is not None, "the README's safe-loading promise moved: keep the floor beside it"
    item = [lines[first]]
    for line in lines[first + 1:]:
        if not line.startswith("  "):
            break
        item.append(line)
    return " ".join(" ".join(item).split())


@pytest.mark.parametrize("version", ["2.13.0+cpu", "2.4.0", "2.5.0a0+git1234abc", "3.0.0", "2.10.1"])
def test_supported_torch_versions_pass_the_check(version: str) -> None:
    from t2r_fairseq.hardening.fairseq_compat import require_safe_loading_torch

    require_safe_loading_torch(version)


@pytest.mark.parametrize("version", ["2.3.1", "2.1.0+cu121", "1.13.1", "2.3.0a0+gitdeadbee"])
def test_older_torch_is_refused_in_one_line_naming_both_versions(version: str) -> None:
    from t2r_fairseq.hardening.fairseq_compat import TorchVersionError, require_safe_loading_torch

    with pytest.raises(TorchVersionError) as info:
        require_safe_loading_torch(version)
    message = str(info.value)
    assert "\n" not in message
    assert f"torch {version} is installed" in message and f"torch >= {_as_text(_code_floor())}" in message


def _import_plugin_with(setup: str) -> subprocess.CompletedProcess:
    """Import the plugin in a fresh interpreter after ``setup`` changed what torch reports about itself."""
    code = f"import torch\n{setup}\nimport t2r_fairseq\nprint('imported')"
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=300)


def test_importing_the_plugin_on_an_old_torch_fails_with_one_clear_last_line() -> None:
    proc = _import_plugin_with("torch.__version__ = '2.3.1'")
    assert proc.returncode != 0 and "imported" not in proc.stdout, "the plugin imported on torch 2.3.1"
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("t2r_fairseq.hardening.fairseq_compat.TorchVersionError: t2r_fairseq needs torch >= "), last
    assert "torch 2.3.1 is installed" in last


def test_a_torch_without_the_allow_list_api_is_refused_whatever_its_version_says() -> None:
    """The check is on the API the safe loading needs, not only on the version string (e.g. a vendor build)."""
    proc = _import_plugin_with("del torch.serialization.add_safe_globals")
    assert proc.returncode != 0 and "imported" not in proc.stdout
    assert "TorchVersionError" in proc.stderr.strip().splitlines()[-1]
