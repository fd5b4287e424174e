"""The compose test: the stack of compose/docker-compose.yml, scaled, survives a killed
scheduler and a killed agent without losing or doubling a job.

Run by scripts/test-compose.sh once the images are built. It brings the stack up with 3
schedulers, 2 registries and 6 agents, submits jobs that each leave a file per attempt in a
folder shared by the agents (the ledger: written by the jobs themselves, not by Hodei) and the
example pipeline, kills one scheduler container and one agent container that is running jobs,
then checks against the ledger that every job ran to completion exactly once and that the
recorded outcome is the one that really ran. Prints one line per check and a closing
`compose: N passed, M failed`; exits 1 on any failure. Tears the stack down in any case.

Environment: HODEI_CLI (the `hodei` binary), HODEI_ROOT (the checkout).
"""

import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(os.environ["HODEI_ROOT"])
CLI = os.environ["HODEI_CLI"]
COMPOSE_FILE = ROOT / "compose" / "docker-compose.yml"
PROJECT = f"hodei-compose-test-{os.getpid()}"
SCALE = {"scheduler": 3, "registry": 2, "agent": 6}
JOBS = 24
# Long enough that the kills land while jobs run, short enough for the suite.
JOB_SECONDS = 8
TERMINAL = {"succeeded", "failed", "cancelled", "timed_out"}

results: list[tuple[str, bool, str]] = []


def check(name: str, ok: bool, detail: str = "") -> bool:
    results.append((name, ok, detail))
    print(f"compose: {'ok' if ok else 'FAILED'}: {name}{': ' + detail if detail and not ok else ''}",
          flush=True)
    return ok


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run(args: list[str], env: dict | None = None, check_rc: bool = True) -> str:
    done = subprocess.run(args, env=env, capture_output=True, text=True, timeout=300)
    if check_rc and done.returncode != 0:
        raise RuntimeError(f"{' '.join(args)} failed ({done.returncode}): {done.stderr}{done.stdout}")
    return done.stdout


def wait_until(what: str, deadline_s: float, probe):
    """Polls `probe` until it returns something truthy or the deadline passes."""
    deadline = time.monotonic() + deadline_s
    last = None
    while time.monotonic() < deadline:
        try:
            last = probe()
        except (RuntimeError, ValueError, KeyError) as e:
            last = e
        else:
            if last:
                return last
        time.sleep(0.5)
    raise TimeoutError(f"{what}: not within {deadline_s:.0f} s (last: {last})")


class Stack:
    def __init__(self, ledger: Path, port: int):
        self.env = dict(os.environ)
        self.env.update(HODEI_LEDGER_DIR=str(ledger), HODEI_GRPC_PORT=str(port),
                        HODEI_IMAGE_TAG=os.environ.get("HODEI_IMAGE_TAG", "dev"))
        self.cli_env = dict(os.environ)
        self.cli_env.update(HODEI_SERVER=f"http://127.0.0.1:{port}")

    def compose(self, *args: str, check_rc: bool = True) -> str:
        return run(["docker-compose", "-p", PROJECT, "-f", str(COMPOSE_FILE), *args],
                   env=self.env, check_rc=check_rc)

    def containers(self, service: str) -> list[str]:
        return self.compose("ps", "-q", service).split()

    def health(self, container: str) -> str:
        return run(["docker", "inspect", "--format",
                    "{{if .State.Health}}{{.State.Health.Status}}{{else}}none{{end}}",
                    container]).strip()

    def hodei(self, *args: str):
        return json.loads(run([CLI, "--output", "json", *args], env=self.cli_env))


def job_script() -> str:
    # One file per attempt, named after the job and attempt, with the host (the agent's
    # container) that ran it; "done" only once the whole job ran.
    return (
        'f="/ledger/$HODEI_JOB_ID.$HODEI_ATTEMPT"; '
        'echo "start $(hostname)" > "$f"; '
        f'sleep {JOB_SECONDS}; '
        'echo done >> "$f"'
    )


def main() -> int:
    ledger = Path(tempfile.mkdtemp(prefix="hodei-ledger-"))
    ledger.chmod(0o777)  # the agents run as uid 10001
    stack = Stack(ledger, free_port())
    started = time.monotonic()
    try:
        scale = [arg for s, n in SCALE.items() for arg in ("--scale", f"{s}={n}")]
        stack.compose("up", "-d", *scale)
        every = [c for s in ("nats", "postgres", "api-gateway", *SCALE) for c in stack.containers(s)]
        check("13 containers up", len(every) == 3 + sum(SCALE.values()), str(len(every)))
        wait_until("every container healthy", 240,
                   lambda: all(stack.health(c) == "healthy" for c in every))
        check("every container healthy (its HEALTHCHECK: /healthz and /readyz)", True)

        token = stack.compose("run", "--rm", "admin", "token", "create", "--name",
                              "compose-test", "--role", "admin").strip().splitlines()[-1]
        stack.cli_env["HODEI_TOKEN"] = token

        def ready_workers():
            ready = [w for w in stack.hodei("workers")["workers"] if w["status"] == "ready"]
            return ready if len(ready) >= SCALE["agent"] else None

        workers = wait_until("6 ready workers", 120, ready_workers)
        ids = {w["id"] for w in workers}
        agents = {c[:12] for c in stack.containers("agent")}
        check("each agent replica has its own worker id (its container's)",
              len(ids) == 6 and ids == agents, f"{sorted(ids)} vs {sorted(agents)}")

        jobs = [stack.hodei("submit", "--name", f"compose-{i}", "--label", "test=compose",
                            "--script", job_script())["id"] for i in range(JOBS)]
        run_id = stack.hodei("pipeline", "submit", "-f",
                             str(ROOT / "examples" / "pipelines" / "build-test-deploy.yaml"))["id"]

        # The faults, once most jobs run: one scheduler, and one agent that runs jobs.
        def running_hosts():
            hosts = {}
            for f in ledger.iterdir():
                lines = f.read_text().split()
                if len(lines) >= 2 and lines[0] == "start" and "done" not in lines:
                    hosts.setdefault(lines[1], []).append(f.name)
            return hosts if sum(len(v) for v in hosts.values()) >= JOBS // 2 else None

        hosts = wait_until("half the jobs running", 120, running_hosts)
        victim_agent = max(hosts, key=lambda h: len(hosts[h]))
        victim_scheduler = stack.containers("scheduler")[0]
        run(["docker", "kill", victim_scheduler])
        run(["docker", "kill", next(c for c in stack.containers("agent") if c.startswith(victim_agent))])
        print(f"compose: killed scheduler {victim_scheduler[:12]} and agent {victim_agent} "
              f"(running {len(hosts[victim_agent])} attempts)", flush=True)

        def all_ended():
            got = [stack.hodei("get", j) for j in jobs]
            return got if all(g["state"] in TERMINAL for g in got) else None

        ended = wait_until("every job ended", 300, all_ended)
        check(f"all {JOBS} jobs succeeded",
              all(g["state"] == "succeeded" for g in ended),
              str([(g["id"], g["state"]) for g in ended if g["state"] != "succeeded"]))

        # The ledger against the recorded outcomes.
        files = {f.name: f.read_text().split() for f in ledger.iterdir()}
        doubled, mismatched, lost = [], [], []
        for g in ended:
            done = [name for name, lines in files.items()
                    if name.startswith(g["id"] + ".") and "done" in lines]
            final = g["attempts"][-1]
            if len(done) > 1:
                doubled.append((g["id"], done))
            elif not done:
                lost.append(g["id"])
            elif done[0] != f"{g['id']}.{final['attempt']}" or files[done[0]][1] != final["worker_id"]:
                mismatched.append((g["id"], done[0], final["attempt"], final["worker_id"]))
        check("no job ran to completion twice (ledger)", not doubled, str(doubled))
        check("every job ran to completion once (ledger)", not lost, str(lost))
        check("each job's recorded final attempt and worker are the ones that completed (ledger)",
              not mismatched, str(mismatched))
        requeued = [g["id"] for g in ended
                    if any(a["worker_id"] == victim_agent for a in g["attempts"][:-1])]
        check("the killed agent's attempts were run again elsewhere",
              len(requeued) >= len(hosts[victim_agent]) and all(
                  g["attempts"][-1]["worker_id"] != victim_agent for g in ended),
              f"{len(requeued)} requeued of {len(hosts[victim_agent])}")

        def run_ended():
            r = stack.hodei("pipeline", "get", run_id)
            return r if r["state"] in TERMINAL else None

        pipeline = wait_until("the pipeline run ended", 240, run_ended)
        check("the pipeline (build, 4 matrix tests with its artifact, deploy, cleanup) succeeded",
              pipeline["state"] == "succeeded"
              and all(s["state"] == "succeeded" for s in pipeline["steps"]),
              str([(s["name"], s["state"]) for s in pipeline["steps"]]))

        # The surviving schedulers and the other agents still take work.
        after = stack.hodei("submit", "--name", "compose-after", "--script",
                            'echo after > "/ledger/after.$HODEI_JOB_ID"')["id"]
        last = wait_until("a job after the faults ended", 120,
                          lambda: (lambda g: g if g["state"] in TERMINAL else None)(
                              stack.hodei("get", after)))
        check("a job submitted after the faults succeeds", last["state"] == "succeeded",
              last["state"])
    except Exception as e:  # noqa: BLE001 - any failure of the run is a failed check
        check("the run completed", False, f"{type(e).__name__}: {e}")
        logs = ROOT / ".hodei" / "compose-test.log"
        logs.write_text(stack.compose("logs", "--no-color", check_rc=False))
        print(f"compose: the containers' logs are in {logs}", flush=True)
    finally:
        stack.compose("down", "-v", "--remove-orphans", "--timeout", "5", check_rc=False)
        shutil.rmtree(ledger, ignore_errors=True)
    passed = sum(1 for _, ok, _ in results if ok)
    failed = len(results) - passed
    print(f"compose: the run took {time.monotonic() - started:.0f} s", flush=True)
    print(f"compose: {passed} passed, {failed} failed", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
