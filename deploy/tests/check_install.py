"""Checks what ansible/site.yml wrote for ansible/tests/inventory.yml.

    python3 check_install.py TEST_DIR BINARY CONFIG [--update-examples]
    python3 check_install.py --example-inventory ROOTS BINARY CONFIG

TEST_DIR holds roots/<host>/ (each host's jobz_root) and the key files the
test gave the role. EXPECTED below is what each host must end up with: its
units' exact command lines, its secret files and their modes. The units are
also checked for their sandbox directives, run through `systemd-analyze
verify` when this machine has it, and the `example` host's units must equal
deploy/systemd/ (--update-examples rewrites those from them).
"""

import hashlib
import os
import shutil
import stat
import sys
import tempfile
from pathlib import Path

from checks import (
    Checks,
    check_flags,
    directive,
    exec_start_words,
    flag_lines,
    known_flags,
    parse_unit,
    run,
)

REPO = Path(__file__).resolve().parents[2]
EXAMPLES = REPO / "deploy" / "systemd"
BINARY_PATH = "/usr/local/bin/jobz"
BROKER_ENDPOINT = "tcp://10.0.0.10:6770"
DEFAULT_BROKER = [
    ["--config", "/etc/jobz/jobz.yaml"],
    ["--http", "0.0.0.0:6769"],
    ["--bind", "tcp://0.0.0.0:6770"],
    ["--data", "/var/lib/jobz"],
]

# host -> {"units": {process: ExecStart flag lines}, "files": {path: mode},
#          "stop_seconds": worker TimeoutStopSec, "sandbox": worker overrides}
EXPECTED = {
    "test-broker": {
        "units": {
            "broker": [
                ["--config", "/etc/jobz/jobz.yaml"],
                ["--http", "10.0.0.10:6769"],
                ["--bind", "tcp://0.0.0.0:6770"],
                ["--data", "/var/lib/jobz"],
                ["--lease-timeout", "20s"],
                ["--retention", "3d"],
                ["--allow-drift"],
                ["--curve-key", "/etc/jobz/keys/jobz.key"],
                ["--allowed-keys", "/etc/jobz/keys/allowed"],
                ["--tls-cert", "/etc/jobz/tls/cert.pem"],
                ["--tls-key", "/etc/jobz/tls/key.pem"],
                ["--client-ca", "/etc/jobz/tls/client-ca.pem"],
            ],
        },
        "files": {
            "etc/jobz/keys/jobz.key": (0o600, "keys/test-broker/jobz.key"),
            "etc/jobz/keys/allowed/test-worker.pub": (0o640, "keys/test-worker.pub"),
            "etc/jobz/keys/allowed/test-mixed.pub": (0o640, "keys/test-mixed.pub"),
            "etc/jobz/tls/cert.pem": (0o640, "tls/cert.pem"),
            "etc/jobz/tls/key.pem": (0o600, "tls/key.pem"),
            "etc/jobz/tls/client-ca.pem": (0o640, "tls/ca.pem"),
        },
    },
    "test-worker": {
        "units": {
            "worker": [
                ["--config", "/etc/jobz/jobz.yaml"],
                ["--broker", BROKER_ENDPOINT],
                ["--grace", "45s"],
                ["--concurrency", "3"],
                ["--topics", "hello,shard"],
                ["--name", "worker one"],
                ["--exit-when-idle", "10m"],
                ["--curve-key", "/etc/jobz/keys/jobz.key"],
                ["--broker-key", "/etc/jobz/keys/broker.pub"],
            ],
        },
        "files": {
            "etc/jobz/keys/jobz.key": (0o600, "keys/test-worker/jobz.key"),
            "etc/jobz/keys/broker.pub": (0o640, "keys/test-broker/jobz.pub"),
            "etc/jobz/jobz.env": (0o600, None),
        },
        "env_file": "JOBZ_TOKEN=worker-secret-token\n",
        "stop_seconds": 45 + 10 + 20,
        "sandbox": {
            "ProtectHome": "no",
            "ReadWritePaths": "/var/lib/jobz -/srv/jobz-work",
            "RestrictAddressFamilies": None,
        },
    },
    "test-mixed": {
        "units": {
            "worker": [
                ["--config", "/etc/jobz/jobz.yaml"],
                ["--broker", BROKER_ENDPOINT],
                ["--grace", "30s"],
            ],
            "semaphore": [
                ["--config", "/etc/jobz/jobz.yaml"],
                ["--broker", BROKER_ENDPOINT],
            ],
        },
        "files": {},
        "environment": ["JOBZ_LOG=debug", "TZ=Europe/Madrid"],
    },
    "example": {
        "units": {
            "broker": DEFAULT_BROKER,
            "worker": [
                ["--config", "/etc/jobz/jobz.yaml"],
                ["--broker", "tcp://jobz-broker.example:6770"],
                ["--grace", "30s"],
            ],
            "semaphore": [
                ["--config", "/etc/jobz/jobz.yaml"],
                ["--broker", "tcp://jobz-broker.example:6770"],
            ],
        },
        "files": {},
    },
}

# Sandbox directives every unit of a process must carry (worker: the role's
# defaults; a host's "sandbox" overrides them, None = absent).
SANDBOX = {
    "broker": {
        "User": "jobz",
        "Type": "exec",
        "Restart": "on-failure",
        "NoNewPrivileges": "yes",
        "ProtectSystem": "strict",
        "ReadWritePaths": "/var/lib/jobz",
        "PrivateTmp": "yes",
        "ProtectHome": "yes",
        "ProtectKernelTunables": "yes",
        "ProtectControlGroups": "yes",
        "RestrictSUIDSGID": "yes",
        "LockPersonality": "yes",
        "RestrictAddressFamilies": "AF_INET AF_INET6 AF_UNIX",
        "CapabilityBoundingSet": "",
        "LimitNOFILE": "65536",
        "WorkingDirectory": "/var/lib/jobz",
    },
    "worker": {
        "User": "jobz",
        "Type": "exec",
        "Restart": "on-failure",
        "KillMode": "mixed",
        "NoNewPrivileges": "yes",
        "ProtectSystem": "strict",
        "ReadWritePaths": "/var/lib/jobz",
        "PrivateTmp": "yes",
        "ProtectHome": "read-only",
        "ProtectKernelTunables": "yes",
        "ProtectControlGroups": "yes",
        "RestrictSUIDSGID": "yes",
        "LockPersonality": "yes",
        "RestrictAddressFamilies": "AF_INET AF_INET6 AF_UNIX",
        "CapabilityBoundingSet": "",
        "LimitNOFILE": "65536",
        "EnvironmentFile": "-/etc/jobz/jobz.env",
        "WorkingDirectory": "/var/lib/jobz",
    },
    "semaphore": {
        "User": "jobz",
        "Type": "exec",
        "Restart": "on-failure",
        "NoNewPrivileges": "yes",
        "ProtectSystem": "strict",
        "ReadWritePaths": None,
        "PrivateTmp": "yes",
        "ProtectHome": "yes",
        "ProtectKernelTunables": "yes",
        "ProtectControlGroups": "yes",
        "RestrictSUIDSGID": "yes",
        "LockPersonality": "yes",
        "RestrictAddressFamilies": "AF_INET AF_INET6 AF_UNIX",
        "CapabilityBoundingSet": "",
        "LimitNOFILE": "65536",
        "EnvironmentFile": "-/etc/jobz/jobz.env",
        "WorkingDirectory": "/var/lib/jobz",
    },
}

SECRET_TEXTS = ["worker-secret-token"]

# ansible/inventory.example.yml: host -> {process: flags its ExecStart must hold}
EXAMPLE_ENDPOINT = ["--broker", "tcp://10.0.0.10:6770"]
EXAMPLE_INVENTORY = {
    "jobz-broker-1": {"broker": DEFAULT_BROKER},
    "jobz-semaphore-1": {"semaphore": [EXAMPLE_ENDPOINT]},
    "jobz-worker-1": {"worker": [EXAMPLE_ENDPOINT, ["--grace", "60s"]]},
    "jobz-worker-2": {"worker": [EXAMPLE_ENDPOINT, ["--grace", "60s"], ["--concurrency", "2"]]},
    "jobz-worker-3": {"worker": [EXAMPLE_ENDPOINT, ["--grace", "60s"], ["--topics", "shard,merge"]]},
}


def sha256(path):
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def mode_of(path):
    return stat.S_IMODE(os.stat(path).st_mode)


def check_host(checks, test_dir, host, expected, binary, config, binary_sha):
    root = test_dir / "roots" / host
    installed = root / BINARY_PATH.lstrip("/")
    checks.check(
        f"{host}: binary installed, executable",
        installed.is_file() and mode_of(installed) == 0o755 and sha256(installed) == binary_sha,
        f"{installed} missing, not 0755 or not the built binary",
    )
    code, out = run([str(installed), "--version"])
    checks.check(f"{host}: binary runs --version", code == 0 and out.startswith("jobz "), out)

    job_file = root / "etc/jobz/jobz.yaml"
    checks.check(
        f"{host}: job file installed 0640",
        job_file.is_file() and job_file.read_bytes() == Path(config).read_bytes() and mode_of(job_file) == 0o640,
        f"{job_file} missing, different or not 0640",
    )
    code, out = run([str(installed), "check", "--config", str(job_file)])
    checks.check(f"{host}: jobz check accepts the installed job file", code == 0, out)
    checks.check(f"{host}: data directory", (root / "var/lib/jobz").is_dir(), "var/lib/jobz missing")

    for rel, (mode, source) in expected["files"].items():
        path = root / rel
        ok = path.is_file() and mode_of(path) == mode
        if ok and source:
            ok = path.read_bytes() == (test_dir / source).read_bytes()
        checks.check(
            f"{host}: {rel} mode {mode:o}",
            ok,
            f"missing, mode {mode_of(path):o} or different content" if path.exists() else "missing",
        )
    # Secret files a host was not given must not be there.
    secret_dirs = [root / "etc/jobz/keys", root / "etc/jobz/tls"]
    present = {str(p.relative_to(root)) for d in secret_dirs if d.is_dir() for p in d.rglob("*") if p.is_file()}
    for name in ("etc/jobz/jobz.env",):
        if (root / name).exists():
            present.add(name)
    extra = present - set(expected["files"])
    checks.check(f"{host}: no other key, certificate or token files", not extra, f"unexpected {sorted(extra)}")
    if "env_file" in expected:
        env_file = root / "etc/jobz/jobz.env"
        checks.check(
            f"{host}: JOBZ_TOKEN environment file",
            env_file.is_file() and env_file.read_text() == expected["env_file"],
            "missing or different",
        )

    unit_dir = root / "etc/systemd/system"
    found = sorted(p.name for p in unit_dir.glob("*.service")) if unit_dir.is_dir() else []
    wanted = sorted(f"jobz-{p}.service" for p in expected["units"])
    checks.check(f"{host}: units {wanted}", found == wanted, f"found {found}")
    for process, lines in expected["units"].items():
        path = unit_dir / f"jobz-{process}.service"
        if not path.is_file():
            continue
        text = path.read_text()
        unit = parse_unit(text)
        words = exec_start_words(unit)
        checks.check(
            f"{host}: jobz-{process} ExecStart",
            words[:2] == [BINARY_PATH, process] and flag_lines(words[2:]) == lines,
            f"got {words}",
        )
        check_flags(checks, f"{host}: jobz-{process} flags exist in the binary", binary, process, words[2:])
        check_sandbox(checks, host, process, unit, expected)
        leaked = [s for s in SECRET_TEXTS if s in text]
        checks.check(f"{host}: jobz-{process} holds no secret", not leaked, f"{leaked} in the unit")
        environment = [v.strip('"') for k, v in unit["Service"] if k == "Environment"]
        checks.check(
            f"{host}: jobz-{process} environment",
            environment == expected.get("environment", ["JOBZ_LOG=info"]),
            f"got {environment}",
        )


def check_sandbox(checks, host, process, unit, expected):
    wanted = dict(SANDBOX[process])
    if process == "worker":
        wanted.update(expected.get("sandbox", {}))
    wrong = {}
    for key, value in wanted.items():
        got = directive(unit, "Service", key)
        if got != value:
            wrong[key] = got
    checks.check(f"{host}: jobz-{process} sandbox directives", not wrong, f"got {wrong}")
    stop = directive(unit, "Service", "TimeoutStopSec") or ""
    if process == "worker":
        seconds = expected.get("stop_seconds", 30 + 10 + 20)
        checks.check(f"{host}: jobz-worker TimeoutStopSec above grace + kill grace", stop == f"{seconds}s", f"got {stop!r}")
    else:
        checks.check(f"{host}: jobz-{process} TimeoutStopSec", stop == "30s", f"got {stop!r}")


def check_example_inventory(checks, roots, binary):
    """Each host of the example inventory got its units, with the broker's
    address, and only flags the binary has (no security flags there yet)."""
    hosts = sorted(p.name for p in roots.iterdir())
    checks.check("example inventory: every host provisioned", hosts == sorted(EXAMPLE_INVENTORY), f"roots: {hosts}")
    for host, units in EXAMPLE_INVENTORY.items():
        unit_dir = roots / host / "etc/systemd/system"
        found = sorted(p.name for p in unit_dir.glob("*.service")) if unit_dir.is_dir() else []
        checks.check(f"{host}: units", found == sorted(f"jobz-{p}.service" for p in units), f"found {found}")
        for process, lines in units.items():
            path = unit_dir / f"jobz-{process}.service"
            if not path.is_file():
                continue
            unit = parse_unit(path.read_text())
            words = exec_start_words(unit)
            got = flag_lines(words[2:])
            missing = [line for line in lines if line not in got]
            checks.check(f"{host}: jobz-{process} ExecStart", words[:2] == [BINARY_PATH, process] and not missing, f"no {missing} in {words}")
            known = known_flags(binary, process)
            unknown = [w for w in words[2:] if w.startswith("--") and w not in known]
            checks.check(f"{host}: jobz-{process} takes only flags of the binary", not unknown, f"unknown {unknown}")
            if process == "worker":
                stop = directive(unit, "Service", "TimeoutStopSec")
                checks.check(f"{host}: jobz-worker TimeoutStopSec", stop == "90s", f"got {stop!r} for --grace 60s")


def verify_units(checks, test_dir, roots_dir=None):
    """`systemd-analyze verify` on every rendered unit, ExecStart pointed at the
    host's installed binary (verify checks that the program exists)."""
    roots_dir = roots_dir or test_dir / "roots"
    analyze = shutil.which("systemd-analyze")
    if not analyze:
        checks.note("systemd-analyze not found: units checked by the parser only")
        return
    with tempfile.TemporaryDirectory() as scratch:
        for unit_path in sorted(roots_dir.glob("*/etc/systemd/system/jobz-*.service")):
            root = unit_path.parents[3]
            text = unit_path.read_text().replace(
                f"ExecStart={BINARY_PATH} ", f"ExecStart={root}{BINARY_PATH} "
            )
            copy = Path(scratch) / root.name / unit_path.name
            copy.parent.mkdir(exist_ok=True)
            copy.write_text(text)
            code, out = run([analyze, "verify", "--man=no", "--generators=no", str(copy)])
            checks.check(
                f"{root.name}: systemd-analyze verify {unit_path.name}",
                code == 0 and not out.strip(),
                f"exit {code}: {out.strip()}",
            )


def check_examples(checks, test_dir, update):
    rendered = test_dir / "roots" / "example" / "etc/systemd/system"
    names = sorted(p.name for p in rendered.glob("jobz-*.service"))
    if update:
        EXAMPLES.mkdir(exist_ok=True)
        for old in EXAMPLES.glob("jobz-*.service"):
            old.unlink()
        for name in names:
            shutil.copyfile(rendered / name, EXAMPLES / name)
        print(f"updated {EXAMPLES}")
    kept = sorted(p.name for p in EXAMPLES.glob("jobz-*.service"))
    checks.check("deploy/systemd: one example per process", kept == names, f"{kept} != {names}")
    stale = [n for n in names if (EXAMPLES / n).is_file() and (EXAMPLES / n).read_text() != (rendered / n).read_text()]
    checks.check(
        "deploy/systemd: examples equal the role's rendering (deploy/test.sh --update)",
        not stale,
        f"{stale} differ from the template",
    )


def main():
    args = [a for a in sys.argv[1:] if not a.startswith("--")]
    update = "--update-examples" in sys.argv
    test_dir, binary, config = Path(args[0]), args[1], args[2]
    checks = Checks()
    if "--example-inventory" in sys.argv:
        check_example_inventory(checks, test_dir, binary)
        verify_units(checks, test_dir, roots_dir=test_dir)
        checks.finish()
    binary_sha = sha256(binary)
    hosts = sorted(p.name for p in (test_dir / "roots").iterdir())
    checks.check("every host of the test inventory was provisioned", hosts == sorted(EXPECTED), f"roots: {hosts}")
    for host, expected in EXPECTED.items():
        check_host(checks, test_dir, host, expected, binary, config, binary_sha)
    revoked = test_dir / "roots/test-broker/etc/jobz/keys/allowed/revoked.pub"
    checks.check("a key no longer allowed is removed", not revoked.exists(), f"{revoked} still there")
    verify_units(checks, test_dir)
    check_examples(checks, test_dir, update)
    checks.finish()


if __name__ == "__main__":
    main()
