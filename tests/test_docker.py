"""The Makefile's docker targets as `make -n` prints them, and hadolint on the Dockerfiles (no engine needed; the
images are built and run against a real engine in test_docker_engine.py, `make test-docker`)."""

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
    assert "-e JUPYTER_TOKEN " in run, "the token goes through the environment, never the command line"
    assert "docker build -f docker/Dockerfile.gpu -t siamese:gpu ." in make_n("notebook")


def fake_docker_notebook(tmp_path: Path, **env: str) -> tuple[str, str, str]:
    """Run `make notebook` with a stand-in for docker that reports its arguments and its JUPYTER_TOKEN;
    returns (the token in the printed address, docker's command lines, the token docker was given)."""
    fake = tmp_path / "docker"
    fake.write_text('#!/bin/sh\necho "ARGS: $*"\necho "ENV: $JUPYTER_TOKEN"\n')
    fake.chmod(0o755)
    environment = {k: v for k, v in os.environ.items() if k != "JUPYTER_TOKEN"}
    result = subprocess.run(["make", "--no-print-directory", "notebook", f"DOCKER={fake}", f"DATA={tmp_path}"],
                            cwd=ROOT, capture_output=True, text=True, env={**environment, **env}, check=True)
    address = re.search(r"^Jupyter: http://127.0.0.1:8888/lab\?token=(.*)$", result.stdout, re.M).group(1)
    args = "\n".join(re.findall(r"^ARGS: (.*)$", result.stdout, re.M))
    given = re.findall(r"^ENV: (.*)$", result.stdout, re.M)[-1]
    assert result.stdout.count("Jupyter: http") == 1  # the address is printed once
    return address, args, given


def test_the_jupyter_token_is_random_long_and_never_on_a_command_line(tmp_path):
    address, args, given = fake_docker_notebook(tmp_path)
    assert len(given) >= 32 and address == given, "an empty or short token would let anyone on the machine in"
    assert given not in args
    assert fake_docker_notebook(tmp_path)[2] != given  # a fresh one each time
    # a token of your own, spaces and semicolons included, arrives whole
    address, args, given = fake_docker_notebook(tmp_path, JUPYTER_TOKEN="my token; rm -rf x")
    assert address == given == "my token; rm -rf x" and "my token" not in args


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
    # Jupyter reads JUPYTER_TOKEN, which the Makefile exports: a fresh random one unless you set yours
    assert "jupyter lab --ip=127.0.0.1" in out and "token" not in out.split("jupyter lab")[1]
    assert 'token=%s\\n\' "8888" "$JUPYTER_TOKEN"' in out


@pytest.mark.parametrize("name", ["Dockerfile.cpu", "Dockerfile.gpu"])
def test_dockerfiles_pass_hadolint(name):
    hadolint = shutil.which("hadolint") or str(Path(sys.executable).parent / "hadolint")
    result = subprocess.run([hadolint, str(ROOT / "docker" / name)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "tensorflow/tensorflow:2.21.0" in (ROOT / "docker" / name).read_text()
