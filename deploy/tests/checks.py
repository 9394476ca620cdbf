"""Shared helpers of the deploy checks: a tiny check runner, a systemd unit
parser and what the jobz binary says about its own flags.

Each checker script prints one line per check (`ok NAME` or `FAILED NAME:
why`) and ends with `RESULT passed=N failed=M`, which deploy/test.sh adds up.
"""

import re
import shlex
import subprocess
import sys

# Flags other engineers are adding to the binary; the deployment files render
# them already (ansible/roles/jobz/templates/jobz.service.j2). While the binary
# does not list one in `--help`, the flag check says so instead of failing.
PENDING_FLAGS = {
    "--curve-key",
    "--broker-key",
    "--allowed-keys",
    "--tls-cert",
    "--tls-key",
    "--client-ca",
}

# Deadline of every process a check starts, in seconds.
COMMAND_TIMEOUT_SECONDS = 30


class Checks:
    """Runs named checks, prints each outcome, counts them."""

    def __init__(self):
        self.passed = 0
        self.failed = []
        self.notes = []

    def check(self, name, condition, why=""):
        if condition:
            self.passed += 1
            print(f"ok {name}")
        else:
            self.failed.append(name)
            why = " | ".join(line for line in str(why).splitlines() if line.strip())
            print(f"FAILED {name}: {why}")
        return condition

    def note(self, text):
        if text not in self.notes:
            self.notes.append(text)

    def finish(self):
        for text in self.notes:
            print(f"note: {text}")
        print(f"RESULT passed={self.passed} failed={len(self.failed)}")
        sys.exit(1 if self.failed else 0)


def run(argv, **kwargs):
    """Runs a command under the checks' deadline; returns (exit code, output)."""
    try:
        done = subprocess.run(
            argv,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            timeout=COMMAND_TIMEOUT_SECONDS,
            **kwargs,
        )
    except subprocess.TimeoutExpired:
        return 124, f"timed out after {COMMAND_TIMEOUT_SECONDS}s: {argv}"
    except OSError as e:
        return 127, str(e)
    return done.returncode, done.stdout


def parse_unit(text):
    """A systemd unit as {section: [(key, value), ...]}, continuation lines joined."""
    sections = {}
    current = None
    logical = ""
    for raw in text.splitlines():
        line = logical + raw
        if line.endswith("\\"):
            logical = line[:-1] + " "
            continue
        logical = ""
        stripped = line.strip()
        if not stripped or stripped.startswith(("#", ";")):
            continue
        if stripped.startswith("[") and stripped.endswith("]"):
            current = stripped[1:-1]
            sections.setdefault(current, [])
            continue
        if current is None or "=" not in stripped:
            raise ValueError(f"not a unit line: {raw!r}")
        key, value = stripped.split("=", 1)
        sections[current].append((key.strip(), value.strip()))
    if logical:
        raise ValueError("the unit ends inside a continued line")
    return sections


def directive(unit, section, key):
    """The last value of a directive (systemd's rule for single-valued keys), or None."""
    values = [v for k, v in unit.get(section, []) if k == key]
    return values[-1] if values else None


def exec_start_words(unit):
    return shlex.split(directive(unit, "Service", "ExecStart") or "")


def flag_lines(words):
    """ExecStart words after the subcommand, grouped as [flag, value...]."""
    lines = []
    for word in words:
        if word.startswith("--") or not lines:
            lines.append([word])
        else:
            lines[-1].append(word)
    return lines


_HELP_CACHE = {}


def known_flags(binary, subcommand):
    """The long flags `jobz SUBCOMMAND --help` lists."""
    key = (binary, subcommand)
    if key not in _HELP_CACHE:
        code, out = run([binary, subcommand, "--help"])
        if code != 0:
            raise RuntimeError(f"{binary} {subcommand} --help exited {code}: {out}")
        _HELP_CACHE[key] = set(re.findall(r"(--[a-z][a-z0-9-]*)", out))
    return _HELP_CACHE[key]


def check_flags(checks, name, binary, subcommand, words):
    """Every flag in `words` is one `jobz SUBCOMMAND` takes, or a pending one."""
    known = known_flags(binary, subcommand)
    flags = [w for w in words if w.startswith("--")]
    unknown = [f for f in flags if f not in known and f not in PENDING_FLAGS]
    for flag in flags:
        if flag in PENDING_FLAGS and flag not in known:
            checks.note(f"{flag} is not in `jobz {subcommand} --help` yet (flag name assumed)")
    checks.check(name, not unknown, f"jobz {subcommand} does not take {unknown}")
