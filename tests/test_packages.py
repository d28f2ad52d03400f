"""The Debian packages the tests read: one list (scripts/packages.txt), one installer (scripts/debian-packages.sh),
and `require_package`, which skips a test whose package is missing, or fails it under SIAMESE_TESTS_STRICT=1."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import PACKAGES, ROOT, STRICT, debian_packages, require_package

SCRIPT = ROOT / "scripts" / "debian-packages.sh"


def test_the_list_names_every_package_with_its_file():
    packages = debian_packages()
    assert {"dataset-fashion-mnist", "chromium", "chromium-driver", "docker.io", "debootstrap"} <= set(packages)
    assert all(path.is_absolute() for path in packages.values())
    groups = {line.split()[0] for line in PACKAGES.read_text().splitlines() if line and not line.startswith("#")}
    assert groups == {"data", "fonts", "browser", "docker"}


def test_an_installed_package_passes(tmp_path):
    (tmp_path / "present").touch()
    assert require_package("present-pkg", packages={"present-pkg": tmp_path / "present"}) is None


def test_a_missing_package_skips_naming_it_and_the_fix(tmp_path, monkeypatch):
    monkeypatch.delenv(STRICT, raising=False)
    packages = {"absent-pkg": tmp_path / "absent", "present-pkg": PACKAGES}
    with pytest.raises(pytest.skip.Exception, match=r"needs Debian.s absent-pkg: apt-get install absent-pkg \(make"):
        require_package("present-pkg", "absent-pkg", packages=packages)


def test_strict_mode_fails_instead_of_skipping(tmp_path, monkeypatch):
    monkeypatch.setenv(STRICT, "1")
    with pytest.raises(pytest.fail.Exception, match=r"Debian package absent-pkg is not installed \(.*absent is "
                       r"missing\), and SIAMESE_TESTS_STRICT=1 allows no skip. Fix: apt-get install absent-pkg"):
        require_package("absent-pkg", packages={"absent-pkg": tmp_path / "absent"})


def test_a_suite_with_a_missing_package_passes_skipping_it_and_fails_in_strict_mode(tmp_path):
    (tmp_path / "test_needs.py").write_text(
        "from pathlib import Path\nfrom conftest import require_package\n\n"
        "def test_needs():\n"
        "    require_package('absent-pkg', packages={'absent-pkg': Path('/nonexistent/absent')})\n"
    )
    command = [sys.executable, "-m", "pytest", "-q", "-rs", "-p", "no:cacheprovider", "--rootdir", str(tmp_path),
               "-c", os.devnull, str(tmp_path / "test_needs.py")]
    env = {**os.environ, "PYTHONPATH": f"{ROOT / 'tests'}{os.pathsep}{ROOT}"}
    env.pop(STRICT, None)
    lenient = subprocess.run(command, capture_output=True, text=True, env=env, cwd=tmp_path)
    assert lenient.returncode == 0 and "1 skipped" in lenient.stdout and "apt-get install absent-pkg" in lenient.stdout
    strict = subprocess.run(command, capture_output=True, text=True, env={**env, STRICT: "1"}, cwd=tmp_path)
    assert strict.returncode == 1 and "1 failed" in strict.stdout
    assert "Debian package absent-pkg is not installed" in strict.stdout


def fake_list(tmp_path: Path) -> Path:
    path = tmp_path / "packages.txt"
    path.write_text(f"# group package file what\nbrowser absent-pkg {tmp_path}/absent the fake test\n"
                    f"fonts present-pkg {PACKAGES} nothing\n")
    return path


def run_script(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(SCRIPT), *args], capture_output=True, text=True, env=env, timeout=60)


def test_the_installer_is_silent_when_nothing_is_missing(tmp_path):
    result = run_script("fonts", env={**os.environ, "SIAMESE_PACKAGES": str(fake_list(tmp_path))})
    assert (result.returncode, result.stdout, result.stderr) == (0, "", "")


def test_the_installer_names_what_is_missing_in_one_line_and_lets_the_tests_run(tmp_path):
    env = {**os.environ, "SIAMESE_PACKAGES": str(fake_list(tmp_path))}
    result = run_script("--check", "browser", "fonts", env=env)
    assert result.returncode == 0 and result.stdout == ""
    assert result.stderr == ("Missing Debian packages: absent-pkg (--check installs nothing). Without them: the fake "
                             "test. Fix: sudo apt-get install absent-pkg\n")
    assert run_script("--check", "--require", "browser", env=env).returncode == 1


def test_the_installer_without_apt_get_says_so(tmp_path):
    bin_dir = tmp_path / "bin"  # every tool the script uses, but no apt-get: a machine that is not Debian
    bin_dir.mkdir()
    for tool in ("bash", "env", "id", "mktemp", "grep", "tail", "rm", "sudo", "dirname"):
        if shutil.which(tool):
            (bin_dir / tool).symlink_to(shutil.which(tool))
    env = {"PATH": str(bin_dir), "SIAMESE_PACKAGES": str(fake_list(tmp_path))}
    result = subprocess.run([str(bin_dir / "bash"), str(SCRIPT), "browser"], capture_output=True, text=True, env=env)
    assert result.returncode == 0
    assert "Missing Debian packages: absent-pkg (no apt-get here: not Debian or Ubuntu)" in result.stderr


def test_an_unknown_call_prints_its_usage():
    result = run_script()
    assert result.returncode == 2 and result.stderr.startswith("Usage: ")


def test_the_library_names_the_same_font_packages_as_the_list():
    from siamese.glyphs import FONT_PACKAGES

    fonts = [line.split()[1] for line in PACKAGES.read_text().splitlines() if line.startswith("fonts ")]
    assert FONT_PACKAGES.split() == fonts
