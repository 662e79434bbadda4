"""setup.sh picks the tested Python (3.12) over newer ones, on the PATH or in pyenv."""

import os
import stat
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def fake_executable(path: Path, body: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("#!/bin/sh\n" + body)
    path.chmod(path.stat().st_mode | stat.S_IXUSR)
    return path


def fake_python(path: Path) -> Path:
    """Passes setup.sh's `-c 'version >= 3.12'` check."""
    return fake_executable(path, 'if [ "$1" = "-c" ]; then exit 0; fi\necho "Python 3"\n')


def which_python(bin_dir: Path, **env) -> str:
    result = subprocess.run(
        ["bash", str(ROOT / "setup.sh"), "--which-python"],
        env={"PATH": f"{bin_dir}:/usr/bin:/bin", "HOME": os.environ.get("HOME", "/")} | env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    return result.stdout.strip()


def test_setup_prefers_python_3_12_on_the_path_and_in_pyenv(tmp_path):
    bin_dir = tmp_path / "bin"
    fake_python(bin_dir / "python3.13")
    fake_python(bin_dir / "python3.12")
    assert which_python(bin_dir) == str(bin_dir / "python3.12")

    (bin_dir / "python3.12").unlink()  # only pyenv has 3.12
    pyenv_root = tmp_path / "pyenv"
    for version in ("3.13.0", "3.12.1", "3.12.10"):
        fake_python(pyenv_root / "versions" / version / "bin" / "python")
    fake_executable(
        bin_dir / "pyenv",
        f'case "$1" in\n  versions) printf "3.13.0\\n3.12.1\\n3.12.10\\n3.11.4\\n" ;;\n'
        f'  root) echo "{pyenv_root}" ;;\nesac\n',
    )
    assert which_python(bin_dir) == str(pyenv_root / "versions" / "3.12.10" / "bin" / "python")

    for version in ("3.12.1", "3.12.10"):  # no 3.12 anywhere: the newer one is used
        (pyenv_root / "versions" / version / "bin" / "python").unlink()
    fake_executable(bin_dir / "pyenv", f'[ "$1" = root ] && echo "{pyenv_root}"\n')
    assert which_python(bin_dir) == str(bin_dir / "python3.13")
    chosen = fake_python(tmp_path / "chosen" / "python")
    assert which_python(bin_dir, PYTHON=str(chosen)) == str(chosen)
