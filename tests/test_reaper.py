"""`siamese.reaper`, what kills a local Ray when its driver is SIGKILLed, on a process tree shaped like Ray's:
a marked service (raylet) that starts an agent with an environment of its own, without the mark."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from siamese import reaper

SLEEP = [sys.executable, "-c", "import time; time.sleep(120)"]
SERVICE = f"""
import subprocess, time
agent = subprocess.Popen({SLEEP!r}, env={{"PATH": "/usr/bin"}})  # a clean environment, as raylet's agents
print(agent.pid, flush=True)
time.sleep(120)
"""
RUN = f"""
import json, os, subprocess, sys, time
reaper = subprocess.Popen([sys.executable, sys.argv[1], "m4rk", str(os.getpid())], stdin=subprocess.PIPE,
                          start_new_session=True)
bystander = subprocess.Popen({SLEEP!r})  # the run's own child, not marked: it must live
service = subprocess.Popen([sys.executable, "-c", {SERVICE!r}], env={{**os.environ, "SIAMESE_RAY_OWNER": "m4rk"}},
                           stdout=subprocess.PIPE, text=True)
agent = int(service.stdout.readline())
print(json.dumps({{"reaper": reaper.pid, "bystander": bystander.pid, "service": service.pid, "agent": agent}}),
      flush=True)
time.sleep(120)
"""


def alive(pid: int) -> bool:
    return pid in reaper.processes()


@pytest.mark.skipif(not Path("/proc/self/environ").exists(), reason="the reaper reads /proc (Linux)")
def test_a_sigkilled_run_takes_its_marked_processes_and_those_below_them_but_no_other():
    run = subprocess.Popen([sys.executable, "-c", RUN, reaper.__file__], stdout=subprocess.PIPE, text=True)
    pids = json.loads(run.stdout.readline())
    try:
        time.sleep(1.5)  # the reaper notes the tree every 0.5 s
        assert all(alive(pid) for pid in pids.values())
        run.send_signal(signal.SIGKILL)
        run.wait()
        deadline = time.monotonic() + 20
        while (alive(pids["service"]) or alive(pids["agent"]) or alive(pids["reaper"])) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not alive(pids["service"]), "the marked service outlived its run"
        assert not alive(pids["agent"]), "the agent below the marked service outlived its run"
        assert not alive(pids["reaper"]), "the reaper did not end once nothing was left to kill"
        assert alive(pids["bystander"]), "the reaper killed a process that was neither marked nor below one"
    finally:
        for pid in pids.values():
            if alive(pid):
                os.kill(pid, signal.SIGKILL)
