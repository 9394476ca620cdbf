#!/usr/bin/env python3
"""The dashboard and /metrics against a real `jobz up`, as an operator sees them.

1. Starts `jobz up` (the release binary) on free ports in a temp dir.
2. Opens the dashboard in headless Chromium, driven over the DevTools protocol.
3. Starts a job through the API and waits until the page shows it, then shows
   it succeeded; opens it (its log on the page) and checks the chain.
4. Makes the broker busy (many jobs, failures, a gate, a limit) and runs
   `promtool check metrics` on its /metrics.
5. Saves a screenshot of the page (docs/dashboard.png when --screenshot is given).

Every wait has a deadline; everything started is killed by PID at the end.
Prints `dashboard: N passed, 0 failed` or exits non-zero naming the failed check.
"""
import argparse, base64, hashlib, json, os, shutil, signal, socket, subprocess, sys, tempfile, time, urllib.request

import websocket  # websocket-client, installed by .ci/ops-checks.sh into its venv

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BIN = os.environ.get("JOBZ_BIN", os.path.join(ROOT, "target", "release", "jobz"))
JOB_FILE = """
jobs:
  hello:
    shell: true
    command: "echo hello {who}; sleep 1.5; echo done"
    params:
      who: { default: world, pattern: '^[a-z]+$' }
    on_success: [ { job: bye, params: { who: "{who}" } } ]
  bye:
    command: "echo bye {who}"
    params:
      who: { required: true }
  shard:
    command: "echo shard {n}"
    params:
      n: { pattern: '^[0-9]+$' }
      day: { default: today, pattern: '^[a-z0-9_]+$' }
  merge:
    command: "echo merged {day}"
    params:
      day: { required: true }
  breaks:
    command: "false"
    retries: { max: 1, backoff: 100ms }
  slow:
    command: "sleep 2"
    concurrency: 1
gates:
  all_shards:
    after: [ shard ]
    count: 3
    key: "{day}"
    then: { job: merge, params: { day: "{day}" } }
"""

passed = 0
procs = []


def check(ok, what):
    global passed
    if not ok:
        fail(what)
    passed += 1
    print(f"dashboard: ok: {what}")


def fail(what):
    print(f"dashboard: FAIL: {what}")
    for p in procs:
        try:
            os.killpg(p.pid, signal.SIGKILL)
        except OSError:
            pass
    sys.exit(1)


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def http(url, method="GET"):
    req = urllib.request.Request(url, method=method, data=b"" if method == "POST" else None)
    with urllib.request.urlopen(req, timeout=10) as r:
        return r.status, r.read().decode()


def until(pred, secs, what):
    end = time.time() + secs
    last = None
    while time.time() < end:
        try:
            last = pred()
            if last:
                return last
        except (OSError, ValueError, KeyError):
            pass
        time.sleep(0.1)
    fail(f"timed out after {secs}s waiting for {what} (last: {last!r})")


class Browser:
    """Headless Chromium driven over the DevTools protocol (one page)."""

    def __init__(self, chromium, profile):
        self.port = free_port()
        self.proc = subprocess.Popen(
            [chromium, "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--hide-scrollbars",
             f"--remote-debugging-port={self.port}", f"--user-data-dir={profile}", "--window-size=1400,1300",
             "about:blank"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
        procs.append(self.proc)
        targets = until(lambda: json.loads(http(f"http://127.0.0.1:{self.port}/json/list")[1]), 30, "Chromium's DevTools")
        page = next(t for t in targets if t.get("type") == "page")
        self.ws = websocket.create_connection(page["webSocketDebuggerUrl"], timeout=10, suppress_origin=True)
        self.next_id = 0

    def call(self, method, **params):
        self.next_id += 1
        self.ws.send(json.dumps({"id": self.next_id, "method": method, "params": params}))
        deadline = time.time() + 15
        while time.time() < deadline:
            message = json.loads(self.ws.recv())
            if message.get("id") == self.next_id:
                if "error" in message:
                    fail(f"DevTools {method}: {message['error']}")
                return message.get("result", {})
        fail(f"DevTools {method}: no answer")

    def eval(self, expression):
        result = self.call("Runtime.evaluate", expression=expression, returnByValue=True)
        if "exceptionDetails" in result:
            fail(f"page script error in {expression!r}: {result['exceptionDetails']}")
        return result.get("result", {}).get("value")

    def screenshot(self, path):
        data = self.call("Page.captureScreenshot", format="png")["data"]
        with open(path, "wb") as f:
            f.write(base64.b64decode(data))

    def close(self):
        self.ws.close()
        os.killpg(self.proc.pid, signal.SIGTERM)
        self.proc.wait(timeout=10)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--screenshot", help="where to save a screenshot of the page")
    args = parser.parse_args()
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    check(chromium is not None, "headless Chromium is installed")
    promtool = shutil.which("promtool")
    check(promtool is not None, "promtool is installed")
    check(os.access(BIN, os.X_OK), f"the jobz binary exists at {BIN}")

    work, up, base = start_up(JOB_FILE)
    browser = Browser(chromium, os.path.join(work, "profile"))
    try:
        browser.call("Page.enable")
        browser.call("Page.navigate", url=f"{base}/")
        until(lambda: browser.eval("document.querySelectorAll('#workers tbody tr[data-worker]').length") == 2, 30,
              "the page to list the two workers")
        check(True, "the dashboard loads and shows the workers")

        _, body = http(f"{base}/job_start?job_name=hello&who=page")
        job = json.loads(body)["id"]
        row = f"document.querySelector('#jobs tr[data-job-id=\"{job}\"]')"
        seen = until(lambda: browser.eval(f"{row} && {row}.dataset.status"), 15, "the started job to appear on the page")
        check(seen in ("queued", "running", "succeeded"), f"the started job appears on the page ({seen})")
        until(lambda: browser.eval(f"{row} && {row}.dataset.status") == "running", 15, "the page to show it running")
        check(True, "the page shows the job running")
        until(lambda: browser.eval(f"{row} && {row}.dataset.status") == "succeeded", 30, "the page to show it succeeded")
        check(True, "the page shows the job succeeded")

        browser.eval(f"{row}.click()")
        panel = "document.getElementById('job-section')"
        until(lambda: browser.eval(f"!{panel}.hidden && {panel}.dataset.jobId") == job, 15, "the job panel to open")
        log = until(lambda: "done" in (browser.eval("document.getElementById('job-log').textContent") or "") and
                    browser.eval("document.getElementById('job-log').textContent"), 15, "the job's log on the page")
        check("hello page" in log, "the job panel shows its live log")
        chain = until(lambda: "bye" in (browser.eval("document.getElementById('job-chain').textContent") or "") and
                      browser.eval("document.getElementById('job-chain').textContent"), 15, "the follow-up in the chain")
        check("hello" in chain and "bye" in chain, "the job panel shows its chain (the follow-up)")
        attempts = browser.eval("document.querySelectorAll('#job-attempts tbody tr').length")
        check(attempts == 1, "the job panel lists its attempt")

        # A busy broker: a gate with progress, failures with a retry, a job held by its limit, many jobs.
        for n in (1, 2):
            http(f"{base}/job_start?job_name=shard&n={n}&day=d1")
        for _ in range(3):
            http(f"{base}/job_start?job_name=slow")
        http(f"{base}/job_start?job_name=breaks")
        for i in range(40):
            http(f"{base}/job_start?job_name=hello&who={'abcdefghij'[i % 10]}")
        until(lambda: "2/3 shard" in (browser.eval("document.getElementById('gates').textContent") or ""), 30,
              "the gate's progress on the page")
        check(True, "the page shows a gate's progress per key")
        until(lambda: "concurrency 1" in (browser.eval(
            "Array.from(document.querySelectorAll('#queues tbody tr')).map(r => r.textContent).join('|')") or ""),
              15, "the page to say a limit holds `slow`")
        check(True, "the queues table shows queue depth, running and the limit holding a name")

        # Cancel and retry from the page: a queued job, opened by its address.
        _, body = http(f"{base}/job_start?job_name=slow")
        victim = json.loads(body)["id"]
        browser.eval(f"location.hash = 'job={victim}'")
        until(lambda: browser.eval(f"{panel}.dataset.jobId") == victim, 15, "the queued job's panel")
        until(lambda: browser.eval("!document.getElementById('job-cancel').hidden"), 15, "a Cancel button")
        check(browser.eval("document.getElementById('job-retry').hidden"), "a queued job offers no Retry")
        browser.eval("document.getElementById('job-cancel').click()")
        until(lambda: browser.eval(f"{panel}.dataset.status") == "cancelled", 15, "the page to show it cancelled")
        check(json.loads(http(f"{base}/jobs/{victim}")[1])["status"] == "cancelled", "Cancel on the page cancels the job")
        until(lambda: browser.eval("!document.getElementById('job-retry').hidden"), 15, "a Retry button")
        browser.eval("document.getElementById('job-retry').click()")
        until(lambda: browser.eval(f"{panel}.dataset.status") in ("queued", "running", "succeeded"), 15,
              "the page to show it queued again")
        check(json.loads(http(f"{base}/jobs/{victim}")[1])["status"] != "cancelled", "Retry on the page queues it again")
        browser.eval(f"location.hash = 'job={job}'")

        _, metrics = http(f"{base}/metrics")
        for name in ("jobz_jobs{", "jobz_queue_depth{", "jobz_running{", "jobz_workers ", "jobz_dispatch_latency_seconds_bucket",
                     "jobz_run_time_seconds_bucket", "jobz_store_commit_seconds_bucket", "jobz_http_requests_total{"):
            check(name in metrics, f"/metrics has {name.strip('{ ')}")
        result = subprocess.run([promtool, "check", "metrics"], input=metrics, capture_output=True, text=True, timeout=60)
        check(result.returncode == 0, f"promtool check metrics passes on a busy broker: {result.stdout}{result.stderr}")

        until(lambda: browser.eval(f"{panel}.dataset.status") == "succeeded", 5, "the panel")
        if args.screenshot:
            time.sleep(1.5)
            browser.screenshot(args.screenshot)
            check(os.path.getsize(args.screenshot) > 10_000, f"a screenshot is saved to {args.screenshot}")
    finally:
        browser.close()
        stop_up(up, work)
    with_tokens(chromium)
    print(f"dashboard: {passed} passed, 0 failed")


def start_up(job_file):
    """`jobz up` on free ports in a temp dir with `job_file`; waits for /healthz."""
    work = tempfile.mkdtemp(prefix="jobz-dashboard-")
    with open(os.path.join(work, "jobz.yaml"), "w") as f:
        f.write(job_file)
    http_port, zmq_port = free_port(), free_port()
    base = f"http://127.0.0.1:{http_port}"
    up = subprocess.Popen([BIN, "up", "--config", "jobz.yaml", "--http", f"127.0.0.1:{http_port}",
                           "--bind", f"tcp://127.0.0.1:{zmq_port}", "--data", "data", "--workers", "2"],
                          cwd=work, stdout=open(os.path.join(work, "up.log"), "w"), stderr=subprocess.STDOUT,
                          start_new_session=True)
    procs.append(up)
    until(lambda: http(f"{base}/healthz")[0] == 200, 30, "jobz up's /healthz")
    return work, up, base


def stop_up(up, work):
    os.killpg(up.pid, signal.SIGTERM)
    try:
        up.wait(timeout=20)
    except subprocess.TimeoutExpired:
        os.killpg(up.pid, signal.SIGKILL)
    shutil.rmtree(work, ignore_errors=True)


def with_tokens(chromium):
    """A front door with tokens: the page loads, asks for a token, and offers Cancel
    and Retry only to a token with the admin scope."""
    viewer, ops = "viewer-token-0123456789", "ops-token-0123456789"
    digest = lambda t: "sha256:" + hashlib.sha256(t.encode()).hexdigest()
    job_file = JOB_FILE.replace("gates:", f"""tokens:
  viewer: {{ hash: "{digest(viewer)}", scopes: [ read ] }}
  ops: {{ hash: "{digest(ops)}", scopes: [ start, read, admin ] }}
gates:""", 1)
    work, up, base = start_up(job_file)
    browser = Browser(chromium, os.path.join(work, "profile"))
    try:
        req = urllib.request.Request(f"{base}/job_start?job_name=breaks", headers={"Authorization": f"Bearer {ops}"})
        with urllib.request.urlopen(req, timeout=10) as r:
            failing = json.loads(r.read())["id"]
        browser.call("Page.enable")
        browser.call("Page.navigate", url=f"{base}/#job={failing}")
        until(lambda: "needs a token" in (browser.eval("document.getElementById('error')?.textContent") or ""), 15,
              "the page to ask for a token")
        check(True, "with tokens on, the page loads and asks for a token")

        def use(token):
            browser.eval(f"document.getElementById('token').value = {json.dumps(token)}")
            browser.eval("document.getElementById('token-form').requestSubmit()")

        panel = "document.getElementById('job-section')"
        use(viewer)
        until(lambda: browser.eval(f"{panel}?.dataset.status") == "failed", 30, "the failed job's panel with the read token")
        time.sleep(1.5)  # a refresh more, with GET /auth answered
        check(browser.eval("document.getElementById('job-retry').hidden") and
              browser.eval("document.getElementById('job-cancel').hidden"),
              "a read-only token is offered neither Cancel nor Retry")
        use(ops)
        until(lambda: browser.eval("document.getElementById('job-retry')?.hidden") is False, 15, "a Retry button for ops")
        check(True, "a token with the admin scope is offered Retry on a failed job")
    finally:
        browser.close()
        stop_up(up, work)


if __name__ == "__main__":
    main()
