#!/usr/bin/env bash
# Tests the deployment files: the Ansible role and playbook (run against this
# machine into temporary roots), the systemd units and the Kubernetes
# manifests. Installs what it needs from PyPI into a virtual environment
# (target/deploy-venv, reused while deploy/tests/requirements.txt is unchanged).
#
#   deploy/test.sh            run every check; the last line is
#                             `deploy: N passed, M failed`
#   deploy/test.sh --update   also rewrite deploy/systemd/ from the role's template
#
# Needs python3 (>= 3.11) and the built binary (cargo build --release -p jobz;
# JOBZ_BINARY overrides target/release/jobz). KEEP=1 keeps the temporary directory.
set -euo pipefail
cd "$(dirname "$0")/.."
repo=$PWD

update=""
[ "${1:-}" = "--update" ] && update="--update-examples"

binary=$(realpath "${JOBZ_BINARY:-target/release/jobz}")
if [ ! -x "$binary" ]; then
  echo "deploy: $binary not found; build it first: cargo build --release -p jobz" >&2
  exit 1
fi

work=$(mktemp -d "${TMPDIR:-/tmp}/jobz-deploy-test.XXXXXX")
if [ -z "${KEEP:-}" ]; then trap 'rm -rf "$work"' EXIT; else echo "deploy: keeping $work"; fi
mkdir -p "$work/logs"

passed=0
failed_count=0
failed=()

# step NAME SECONDS COMMAND...: runs COMMAND under a deadline, its output in
# $work/logs. A command that ends with `RESULT passed=N failed=M` counts as N
# and M checks, any other as one check (its exit code).
logfile() { echo "$work/logs/$(echo "$1" | tr -c 'A-Za-z0-9\n' '_').log"; }
step() {
  local name=$1 seconds=$2
  shift 2
  local log started=$SECONDS
  log=$(logfile "$name")
  echo "== $name"
  local code=0
  if [ "$(type -t "$1")" = function ]; then
    timeout "$seconds" bash -c '"$@"' step "$@" >"$log" 2>&1 || code=$?
  else
    timeout "$seconds" "$@" >"$log" 2>&1 || code=$?
  fi
  echo "   $((SECONDS - started))s"
  local result
  result=$(grep -E '^RESULT passed=[0-9]+ failed=[0-9]+$' "$log" | tail -n 1 || true)
  if [ -n "$result" ]; then
    local p f
    p=$(echo "$result" | sed -E 's/^RESULT passed=([0-9]+) failed=([0-9]+)$/\1/')
    f=$(echo "$result" | sed -E 's/^RESULT passed=([0-9]+) failed=([0-9]+)$/\2/')
    passed=$((passed + p))
    failed_count=$((failed_count + f))
    grep -E '^note: ' "$log" || true
    if [ "$f" -gt 0 ] || [ "$code" -ne 0 ]; then
      grep -E '^FAILED ' "$log" | sed "s/^/  /" || true
      [ "$f" -eq 0 ] && failed_count=$((failed_count + 1))
      failed+=("$name ($f failed checks, exit $code)")
      return 0
    fi
  elif [ "$code" -eq 0 ]; then
    passed=$((passed + 1))
  else
    [ "$code" -eq 124 ] && echo "  timed out after ${seconds}s"
    tail -n 30 "$log" | sed "s/^/  /"
    failed_count=$((failed_count + 1))
    failed+=("$name (exit $code)")
  fi
}

# expect_failure PATTERN COMMAND...: succeeds when COMMAND fails saying PATTERN.
expect_failure() {
  local pattern=$1
  shift
  local out code=0
  out=$("$@" 2>&1) || code=$?
  if [ "$code" -eq 0 ]; then
    echo "$out"
    echo "expected a failure, the command succeeded"
    return 1
  fi
  if ! grep -m 3 -E -- "$pattern" <<<"$out"; then
    echo "$out"
    echo "failed, but without /$pattern/"
    return 1
  fi
}

# idempotent LOG: every host of a playbook run changed nothing and failed nothing.
idempotent() {
  local recap
  recap=$(sed -n '/^PLAY RECAP/,$p' "$1" | grep -E 'ok=[0-9]+')
  echo "$recap"
  [ -n "$recap" ] && ! grep -vqE 'changed=0 .*unreachable=0 +failed=0' <<<"$recap"
}
export -f expect_failure idempotent

# --- the tools ---------------------------------------------------------------
venv="${JOBZ_DEPLOY_VENV:-$repo/target/deploy-venv}"
requirements="$repo/deploy/tests/requirements.txt"
if ! cmp -s "$requirements" "$venv/requirements.txt" 2>/dev/null; then
  echo "== virtual environment $venv"
  rm -rf "$venv"
  timeout 120 python3 -m venv "$venv"
  timeout 600 "$venv/bin/pip" install --quiet --disable-pip-version-check -r "$requirements"
  cp "$requirements" "$venv/requirements.txt"
fi
export PATH="$venv/bin:$PATH"
export LC_ALL=C.UTF-8 ANSIBLE_NOCOLOR=1 ANSIBLE_FORCE_COLOR=0 ANSIBLE_PIPELINING=1 ANSIBLE_FORKS=8
export ANSIBLE_HOME="$work/ansible-home" ANSIBLE_LOCAL_TEMP="$work/ansible-tmp" ANSIBLE_REMOTE_TEMP="$work/ansible-tmp"
export ANSIBLE_RETRY_FILES_ENABLED=0
export JOBZ_DEPLOY_TEST_DIR="$work" JOBZ_DEPLOY_TEST_BINARY="$binary"
test_inventory=ansible/tests/inventory.yml
example_inventory=ansible/inventory.example.yml

# --- Ansible: syntax -----------------------------------------------------------
for playbook in ansible/*.yml; do
  case $playbook in ansible/inventory*) continue ;; esac
  for inventory in "$example_inventory" "$test_inventory"; do
    step "ansible-playbook --syntax-check $playbook -i $inventory" 120 \
      ansible-playbook --syntax-check -i "$inventory" "$playbook"
  done
done

# --- Ansible: the test inventory into temporary roots ----------------------------
mkdir -p "$work/keys/test-broker" "$work/keys/test-worker" "$work/tls"
for f in keys/test-broker/jobz.key keys/test-broker/jobz.pub keys/test-worker/jobz.key \
  keys/test-worker.pub keys/test-mixed.pub tls/cert.pem tls/key.pem tls/ca.pem tokens; do
  echo "placeholder for $f, made by deploy/test.sh" >"$work/$f"
done
# A key the broker allowed before and no longer does: the role must remove it.
mkdir -p "$work/roots/test-broker/etc/jobz/keys/allowed"
echo "revoked" >"$work/roots/test-broker/etc/jobz/keys/allowed/revoked.pub"

step "site.yml on the test inventory" 300 \
  ansible-playbook -i "$test_inventory" ansible/site.yml
step "what the role wrote (files, modes, units, systemd-analyze verify)" 120 \
  python3 deploy/tests/check_install.py "$work" "$binary" config/example.yaml $update
step "site.yml again: changed=0 (idempotent)" 300 \
  ansible-playbook -i "$test_inventory" ansible/site.yml
step "second run changed nothing" 10 idempotent "$(logfile "site.yml again: changed=0 (idempotent)")"

# --- Ansible: the role refuses bad input -------------------------------------------
step "the role rejects an unknown process name" 120 expect_failure "brokr" \
  ansible-playbook -i "$test_inventory" ansible/site.yml --limit test-mixed -e '{"jobz_roles": ["brokr"]}'
step "the role wants jobz_broker_endpoint for a worker" 120 expect_failure "jobz_broker_endpoint" \
  ansible-playbook -i "$test_inventory" ansible/site.yml --limit test-mixed -e 'jobz_broker_endpoint='
printf 'jobs:\n  broken:\n    comand: "true"\n' >"$work/broken.yaml"
step "the role keeps a job file jobz check refuses" 120 expect_failure "failed to validate" \
  ansible-playbook -i "$test_inventory" ansible/site.yml --limit test-mixed -e "jobz_config_src=$work/broken.yaml"
step "the installed job file is still the good one" 10 \
  cmp config/example.yaml "$work/roots/test-mixed/etc/jobz/jobz.yaml"

# --- Ansible: the example inventory, every host into its own root -----------------------
step "site.yml on the example inventory" 300 \
  ansible-playbook -i "$example_inventory" ansible/site.yml \
  -e ansible_connection=local -e ansible_become=false -e '{"jobz_manage_services": false}' \
  -e 'ansible_python_interpreter={{ ansible_playbook_python }}' \
  -e "jobz_binary_src=$binary" -e "jobz_example_roots=$work/example-roots" \
  -e 'jobz_root={{ jobz_example_roots }}/{{ inventory_hostname }}'
step "what the example inventory provisions" 120 \
  python3 deploy/tests/check_install.py --example-inventory "$work/example-roots" "$binary" config/example.yaml

# --- Kubernetes ------------------------------------------------------------------
step "Kubernetes manifests (schemas, KEDA, wiring)" 120 \
  python3 deploy/tests/check_kubernetes.py "$binary"

echo "deploy: took ${SECONDS}s"
echo "deploy: $passed passed, $failed_count failed"
if [ ${#failed[@]} -gt 0 ]; then
  printf 'deploy: FAILED %s\n' "${failed[@]}" >&2
  exit 1
fi
