"""The original's docker workflow run for real (`make test-docker`): both images built on a local Debian base, then
`make bash-cpu`, `make serve-docker`, `make notebook` and `make bash-gpu` as a user would type them, against a real
docker engine.

Docker Hub cannot be reached here, so the images are built on `docker/make-test-base.sh`'s Debian bookworm
(`BASE_IMAGE`), the GPU one with CPU TensorFlow: that proves everything but CUDA. The commands run as a user
who is not root (uid 4242 when the tests run as root), in a copy of the repo, so the files they write can be
checked for their owner and nothing lands in the working tree. Without a docker engine these tests fail with the
reason; they never pass silently.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import free_port

from siamese.datasets import make_dataset

pytestmark = pytest.mark.docker
ROOT = Path(__file__).resolve().parents[1]
BASE = "siamese-test-base:bookworm"
IMAGE = "siamese-test"
USER = 4242


def _docker_group() -> list[int]:
    try:
        return [os.stat("/var/run/docker.sock").st_gid]
    except OSError:
        return []


def as_user(argv: list[str], **kwargs) -> subprocess.CompletedProcess | subprocess.Popen:
    """Run `argv` as a user who is not root: uid 4242 (in the docker socket's group) when we are root."""
    popen = kwargs.pop("popen", False)
    if os.geteuid() == 0:
        groups = ",".join(map(str, _docker_group())) or "none"
        argv = ["setpriv", f"--reuid={USER}", f"--regid={USER}", f"--groups={groups}" if groups != "none" else
                "--clear-groups", *argv]
    return (subprocess.Popen if popen else subprocess.run)(argv, **kwargs)


@pytest.fixture(scope="session")
def engine() -> None:
    """A docker engine that answers, the local base image, and both images built on it (IMAGE:cpu, IMAGE:gpu)."""
    if shutil.which("docker") is None:
        pytest.fail("no docker client: install docker.io (make test-docker does, through .ci/run)")
    info = subprocess.run(["docker", "info", "--format", "{{.ServerVersion}}"], capture_output=True, text=True)
    if info.returncode:
        pytest.fail(f"the docker engine does not answer ({info.stderr.strip()}); start dockerd")
    subprocess.run(["bash", str(ROOT / "docker" / "make-test-base.sh"), BASE], check=True, cwd=ROOT)
    build = subprocess.run(["make", "--no-print-directory", "docker-build", f"IMAGE={IMAGE}", f"BASE_IMAGE={BASE}"],
                           cwd=ROOT, capture_output=True, text=True)
    assert build.returncode == 0, build.stdout[-3000:] + build.stderr[-3000:]


@pytest.fixture
def repo(engine) -> Iterator[Path]:
    """A copy of the repo's files (as git sees them) owned by the user, with a digits catalog under data/, in a
    folder of /tmp the user can reach (pytest's own are root's alone)."""
    tmp_path = Path(tempfile.mkdtemp(prefix="siamese-docker-", dir="/tmp"))
    files = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=ROOT,
                           capture_output=True, check=True).stdout.decode().split("\0")
    copy = tmp_path / "repo"
    for name in filter(None, files):
        if (ROOT / name).is_file():
            (copy / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / name, copy / name)
    make_dataset("digits", tmp_path / "data" / "digits", limit=200, progress=False)
    (tmp_path / "home").mkdir()
    if os.geteuid() == 0:
        subprocess.run(["chown", "-R", f"{USER}:{USER}", str(tmp_path)], check=True)
    tmp_path.chmod(0o755)
    yield copy
    shutil.rmtree(tmp_path, ignore_errors=True)


def make(repo: Path, *args: str, popen: bool = False, **kwargs):
    """`make ARGS` in the copy as the user, with the test image, its HOME and DATA in the test's folder."""
    argv = ["make", "--no-print-directory", *args, f"IMAGE={IMAGE}", f"BASE_IMAGE={BASE}",
            f"DATA={repo.parent / 'data'}", "DOCKER_TTY="]
    env = kwargs.pop("env", {**os.environ, "HOME": str(repo.parent / "home")})
    return as_user(argv, cwd=repo, env=env, text=True, popen=popen,
                   **({"stdout": subprocess.PIPE, "stderr": subprocess.PIPE} | kwargs))


def owners(folder: Path) -> set[int]:
    return {p.stat().st_uid for p in [folder, *folder.rglob("*")]}


def test_make_bash_cpu_runs_the_original_commands_as_the_user_and_serve_docker_serves_the_index(repo):
    uid = USER if os.geteuid() == 0 else os.geteuid()
    train = ("python utilities.py train --labeled-data /data/digits/train.json --image-dir /data/digits "
             "--output checkpoints/X.hdf5 --epochs 1 --images-per-epoch 256 --image-size 16 --no-progress")
    export = "python utilities.py --export savedmodel --keras-model checkpoints/X.hdf5"
    index = ("python utilities.py --export balltree --keras-model checkpoints/X.hdf5 "
             "--labeled-data /data/digits/train.json --image-dir /data/digits --output /data/index")
    result = make(repo, "bash-cpu", f"COMMAND=bash -c 'id -u && {train} && {export} && {index}'")
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert str(uid) in result.stdout.splitlines(), "the container runs as the calling user"
    assert (repo / "exports" / "savedmodel" / "1" / "saved_model.pb").is_file()
    assert "Indexed 200 images of 10 items" in result.stdout
    index = json.loads((repo.parent / "data" / "index" / "index.json").read_text())
    assert index["rows"] == 200 and index["embedder"]["keras_model"] == "/app/checkpoints/X.hdf5"
    assert owners(repo / "checkpoints") == owners(repo / "exports") == owners(repo.parent / "data" / "index") == {uid}
    served_by_the_cpu_image(repo)


def served_by_the_cpu_image(repo: Path) -> None:
    """`make serve-docker` on the index just built in the container: on 127.0.0.1 only, and only with the token."""
    port, token = free_port(), "serve-token"
    server = make(repo, "serve-docker", "INDEX=/data/index", f"SERVE_PORT={port}", popen=True,
                  stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                  env={**os.environ, "HOME": str(repo.parent / "home"), "SIAMESE_TOKEN": token})
    try:
        wait_for(server, f"http://127.0.0.1:{port}/health", None, "serve")
        assert _get(f"http://127.0.0.1:{port}/info") == 401
        assert _get(f"http://127.0.0.1:{port}/info", token, scheme="Bearer") == 200
        image = next((repo.parent / "data" / "digits" / "images" / "train").rglob("*.png")).read_bytes()  # indexed
        request = urllib.request.Request(f"http://127.0.0.1:{port}/search?k=3", data=image, method="POST",
                                         headers={"Authorization": f"Bearer {token}"})
        with urllib.request.urlopen(request, timeout=30) as response:
            answer = json.loads(response.read())
        assert len(answer["neighbours"]) == 3 and answer["neighbours"][0]["similarity"] > 0.999
        assert_loopback_only(port)
    finally:
        stop(server, "cpu")


def _get(url: str, token: str | None = None, scheme: str = "token") -> int:
    request = urllib.request.Request(url, headers={"Authorization": f"{scheme} {token}"} if token else {})
    try:
        with urllib.request.urlopen(request, timeout=5) as response:
            return response.status
    except urllib.error.HTTPError as e:
        return e.code
    except OSError:  # not listening (yet), or the connection dropped
        return 0


def _other_addresses() -> list[str]:
    """This machine's addresses other than loopback (docker's bridge among them)."""
    out = subprocess.run(["hostname", "-I"], capture_output=True, text=True).stdout.split()
    return [a for a in out if ":" not in a and not a.startswith("127.")]


def wait_for(server: subprocess.Popen, url: str, token: str | None, what: str) -> None:
    """Wait until `url` answers 200 (5 minutes at most) while the `make` of `server` runs."""
    deadline = time.monotonic() + 300
    while _get(url, token) != 200:
        assert server.poll() is None, server.stdout.read()[-3000:]
        assert time.monotonic() < deadline, f"{what} did not answer within 5 minutes"
        time.sleep(1)


def stop(server: subprocess.Popen, tag: str) -> None:
    """Remove the containers of the image `IMAGE:tag` that `server` (a `make` in the background) started."""
    ids = subprocess.run(["docker", "ps", "-q", "--filter", f"ancestor={IMAGE}:{tag}"], capture_output=True,
                         text=True).stdout.split()
    if ids:
        subprocess.run(["docker", "rm", "-f", *ids], capture_output=True)
    server.kill()
    server.wait()


def assert_loopback_only(port: int) -> None:
    for address in _other_addresses():
        with pytest.raises(OSError), socket.create_connection((address, port), timeout=3):
            pass


@pytest.fixture
def notebook(repo) -> Iterator[tuple[int, str]]:
    """`make notebook` (the GPU image on the CPU: GPUS=) running in the background: yields (port, token)."""
    port, token = free_port(), "a token with spaces; and a semicolon"
    server = make(repo, "notebook", "GPUS=", f"PORT={port}", popen=True, stdout=subprocess.PIPE,
                  stderr=subprocess.STDOUT, env={**os.environ, "HOME": str(repo.parent / "home"),
                                                  "JUPYTER_TOKEN": token})
    try:
        wait_for(server, f"http://127.0.0.1:{port}/api/status", token, "Jupyter")
        yield port, token
    finally:
        stop(server, "gpu")


def test_make_notebook_answers_on_localhost_only_and_only_with_the_token(notebook):
    port, token = notebook
    assert _get(f"http://127.0.0.1:{port}/api/status", token) == 200
    assert _get(f"http://127.0.0.1:{port}/api/status") == 403
    assert_loopback_only(port)


def test_the_notebook_runs_inside_the_container_on_the_mounted_catalog(repo):
    params = " ".join(f"-p {k} {v}" for k, v in {
        "LABELED_DATA": "/data/digits/train.json", "IMAGE_DIR": "/data/digits", "IMAGE_SIZE": 16, "EPOCHS": 1,
        "IMAGES_PER_EPOCH": 256, "BATCH_SIZE": 32, "EMBEDDING_DIM": 16, "CHECKPOINT": "/app/checkpoints/nb.hdf5",
        "EXPORT_DIR": "/app/exports/nb", "INDEX_DIR": "/data/nb-index"}.items())
    run = (f"COMMAND=papermill notebooks/train_siamese.ipynb /tmp/executed.ipynb --cwd notebooks -k python3 "
           f"--no-progress-bar {params}")
    result = make(repo, "bash-gpu", "GPUS=", run)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert (repo / "checkpoints" / "nb.hdf5").is_file()
    assert (repo / "exports" / "nb" / "1" / "saved_model.pb").is_file()
    assert json.loads((repo.parent / "data" / "nb-index" / "index.json").read_text())["rows"] == 200


def test_make_bash_gpu_without_a_gpu_says_so_in_one_line(repo):
    result = make(repo, "bash-gpu", "COMMAND=true")
    assert result.returncode != 0
    ended = re.compile(r"make(\[\d+\])?: \*\*\*")  # make's own "*** [bash-gpu] Error 2"
    lines = [line for line in result.stderr.splitlines() if line.strip() and not ended.match(line)]
    said = [line for line in lines if "cannot give a container a GPU here (no NVIDIA runtime" in line]
    assert len(said) == 1 and said[0] == lines[-1] and "make bash-cpu" in said[0], result.stderr
    assert "Traceback" not in result.stderr and "docker: Error" not in result.stderr
