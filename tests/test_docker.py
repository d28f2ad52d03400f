"""The docker images and the Makefile targets that run them (no docker engine here: `make -n` and hadolint)."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def make_n(*args: str, **env: str) -> str:
    """What `make -n ARGS` would run, with `env` in the environment."""
    result = subprocess.run(["make", "-n", "--no-print-directory", *args], cwd=ROOT, capture_output=True, text=True,
                            env={**os.environ, "JUPYTER_TOKEN": "", **env}, check=True)
    return result.stdout


def docker_run_line(output: str) -> str:
    return next(line for line in output.replace("\\\n", " ").splitlines() if line.startswith("docker run"))


def test_notebook_runs_jupyter_in_the_gpu_image_with_all_gpus_and_a_token(tmp_path):
    run = docker_run_line(make_n("notebook", DATA=str(tmp_path)))
    assert "--gpus all" in run and "siamese:gpu" in run and "jupyter lab" in run
    assert f'-v "{tmp_path}":/data' in run and f'-v "{ROOT}":/app' in run
    assert "-p 127.0.0.1:8888:8888" in run, "the port must be published on localhost only"
    token = re.search(r"-e JUPYTER_TOKEN=(\S*)", run).group(1)
    assert len(token) >= 32, "an empty or short token would let anyone on the machine in"
    assert token != re.search(r"-e JUPYTER_TOKEN=(\S*)", docker_run_line(make_n("notebook"))).group(1)
    assert "-e JUPYTER_TOKEN=mine" in docker_run_line(make_n("notebook", JUPYTER_TOKEN="mine"))
    assert "docker build -f docker/Dockerfile.gpu -t siamese:gpu ." in make_n("notebook")


@pytest.mark.parametrize(("target", "image", "gpus"),
                         [("bash-gpu", "siamese:gpu", True), ("bash-cpu", "siamese:cpu", False)])
def test_shells_mount_the_repo_and_data_like_the_seed(tmp_path, target, image, gpus):
    run = docker_run_line(make_n(target, DATA=str(tmp_path)))
    assert run.endswith(f"{image} bash") and ("--gpus all" in run) == gpus
    assert f'-v "{tmp_path}":/data' in run and "-w /app" in run and "--user" in run


def test_data_defaults_to_the_home_folder():
    assert f'-v "{Path.home()}":/data' in docker_run_line(make_n("bash-cpu"))


def test_docker_build_builds_both_images():
    out = make_n("docker-build")
    assert "docker build -f docker/Dockerfile.gpu -t siamese:gpu ." in out
    assert "docker build -f docker/Dockerfile.cpu -t siamese:cpu ." in out


def test_notebook_local_asks_for_a_token_too():
    out = make_n("notebook-local")
    assert "jupyter lab --ip=127.0.0.1" in out and re.search(r"--IdentityProvider.token=\w{32,}", out)


@pytest.mark.parametrize("name", ["Dockerfile.cpu", "Dockerfile.gpu"])
def test_dockerfiles_pass_hadolint(name):
    hadolint = shutil.which("hadolint") or str(Path(sys.executable).parent / "hadolint")
    result = subprocess.run([hadolint, str(ROOT / "docker" / name)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "tensorflow/tensorflow:2.21.0" in (ROOT / "docker" / name).read_text()
