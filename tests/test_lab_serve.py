"""``refimpl lab serve``: the server's promises through HTTP (fields named in 400s, bounded runs, a closed
stream stops its run, exports, offline assets, reference links) and the page in a real browser:
headless Chromium from Debian's ``chromium`` / ``chromium-driver`` packages, driven by selenium.

The browser test skips only where no browser can be had (no chromium or chromedriver binary, or no
selenium), and says which. It saves screenshots (docs/lab-serve-*.png with REFIMPL_SCREENSHOT_DIR=docs) and
prints the time from the Train click to the first curve point and to the end of the run.
"""

from __future__ import annotations

import http.client
import io
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import zipfile
from pathlib import Path

import numpy as np
import pytest

from refimpl.lab import serve as S
from refimpl.lab.diagnose import LABELS, diagnose

ROOT = Path(__file__).resolve().parents[1]


# --------------------------------------------------------------------------- helpers


@pytest.fixture(scope="module")
def server():
    srv = S.LabServer("127.0.0.1", 0, max_runs=2)
    srv.warm()
    thread = threading.Thread(target=srv.serve_forever, daemon=True)
    thread.start()
    yield srv
    srv.close()


def call(srv, method: str, path: str, body=None, timeout: float = 30.0):
    """(status, parsed JSON or bytes, headers) of one request to the test server."""
    host, port = srv.server_address[:2]
    conn = http.client.HTTPConnection(host, port, timeout=timeout)
    data = None if body is None else json.dumps(body).encode()
    conn.request(method, path, body=data, headers={"Content-Type": "application/json"} if data else {})
    r = conn.getresponse()
    raw = r.read()
    conn.close()
    ctype = r.getheader("Content-Type", "")
    return r.status, (json.loads(raw) if ctype.startswith("application/json") else raw), dict(r.getheaders())


def new_session(srv) -> str:
    return call(srv, "POST", "/api/session")[1]["session"]


def wait_for(predicate, timeout: float, what: str, poll: float = 0.05):
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        value = predicate()
        if value:
            return value
        time.sleep(poll)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


def start_run(srv, sid: str, **params) -> str:
    status, body, _ = call(srv, "POST", "/api/runs", {"session": sid, "params": params})
    assert status == 202, body
    return body["id"]


def finished(srv, sid: str, rid: str):
    run = srv.lab.sessions[sid].runs[rid]
    return run if run.status in ("done", "stopped", "error") else None


# --------------------------------------------------------------------------- the server


def test_stream_train_records_the_curve_of_train_adapter_and_stops_when_asked():
    from refimpl.lab import model as M
    from refimpl.lab.experiments import datasets, lab_model
    from refimpl.lab.train import TrainConfig, train_adapter

    cfg, base = lab_model()
    train, val = datasets("facts", 300, cfg, 3)
    acfg = M.AdapterConfig(targets=M.resolve_targets("qv", cfg), rank=4, alpha=8.0, dropout=0.1)
    tcfg = TrainConfig(steps=30, eval_every=10, seed=3, weight_decay=0.01, loraplus_ratio=2.0)
    ref = train_adapter(base, cfg, acfg, train, val, tcfg)
    seen = []
    adapter, curve, stopped = S.stream_train(base, cfg, acfg, train, val, tcfg, seen.append)
    assert not stopped and curve == ref.curve  # the same floats, bit for bit
    assert [p["step"] for p in seen] == list(ref.curve.step)
    assert all(np.array_equal(adapter[k], ref.adapter[k]) for k in ref.adapter)
    calls = []
    _, short, stopped = S.stream_train(
        base, cfg, acfg, train, val, tcfg, lambda p: None, should_stop=lambda: calls.append(1) or len(calls) > 15
    )
    assert stopped and short.step == (0, 10)  # asked before each step: stopped before step 16


def test_tree_path_follows_diagnose_on_every_label():
    t = np.linspace(0, 1, 15)
    train_of = lambda end: 2.0 * (1 - t) ** 3 + end * (1 - (1 - t) ** 3)  # noqa: E731
    cases = {
        "rank_too_low": (train_of(1.6), 2.0 - 0.3 * t),
        "wrong_layers": (train_of(0.2), 2.0 - 0.2 * t),
        "overfitting": (train_of(0.05), 2.0 - 3.0 * t + 3.0 * t**2),
        "healthy": (train_of(0.1), 2.0 - 1.85 * (1 - (1 - t) ** 3)),
    }
    for label, (tr, va) in cases.items():
        d = diagnose(tr, va, chance_loss=2.0)
        assert d.label == label
        path = S.tree_path(d.evidence, d.label)
        assert path[-1] == {"node": label}
        assert [p["yes"] for p in path[:-1]] == [False] * (len(path) - 2) + [label != "healthy"]


@pytest.mark.parametrize(
    ("params", "field"),
    [
        ({"rank": 0}, "rank"),
        ({"rank": 65}, "rank"),
        ({"rank": 2.5}, "rank"),
        ({"dropout": "lots"}, "dropout"),
        ({"dropout": 0.9}, "dropout"),
        ({"layers": "kv"}, "layers"),
        ({"task": "pretrain"}, "task"),
        ({"examples": 1}, "examples"),
        ({"dora": "yes"}, "dora"),
        ({"seed": -1}, "seed"),
        ({"lr": 0}, "lr"),
        ({"colour": "red"}, "colour"),
        ({"weight_decay": None}, "weight_decay"),
    ],
)
def test_bad_parameters_get_a_400_that_names_the_field(server, params, field):
    status, body, _ = call(server, "POST", "/api/runs", {"session": new_session(server), "params": params})
    assert status == 400 and body["field"] == field and body["error"].startswith(f"{field}: "), body


def test_bad_requests_elsewhere_name_their_field(server):
    assert call(server, "POST", "/api/runs", {"session": "nope", "params": {}})[1]["field"] == "session"
    sid = new_session(server)
    status, body, _ = call(server, "POST", "/api/merge", {"session": sid, "a": "x", "b": "y"})
    assert (status, body["field"]) == (400, "run")
    status, body, _ = call(server, "GET", f"/api/runs/zz/export?format=json&session={sid}")
    assert (status, body["field"]) == (400, "run")
    conn = http.client.HTTPConnection(*server.server_address[:2], timeout=10)
    conn.request("POST", "/api/runs", body=b"{not json", headers={"Content-Type": "application/json"})
    r = conn.getresponse()
    assert r.status == 400 and json.loads(r.read())["field"] == "body"


def test_the_page_and_its_assets_come_from_the_package_only(server):
    status, page, headers = call(server, "GET", "/")
    assert status == 200 and b"/static/app.js" in page
    assert "default-src 'self'" in headers["Content-Security-Policy"]
    for name in sorted(p.name for p in S.STATIC.iterdir()):
        status, body, _ = call(server, "GET", f"/static/{name}")
        assert status == 200, name
        text = body.decode()
        # the SVG namespace is an identifier, never fetched; no other address may appear
        for scheme in ("http://", "https://", "//cdn", "@import"):
            assert text.replace("http://www.w3.org/2000/svg", "").count(scheme) == 0, (name, scheme)
    assert call(server, "GET", "/static/../serve.py")[0] == 404


def test_every_control_links_to_a_spec_page_or_function_that_exists(server):
    hrefs = {href for c in S.CONTROLS for _, href in c.links}
    assert all(c.links for c in S.CONTROLS)
    for href in sorted(hrefs):
        path, _, anchor = href.partition("#")
        if path.startswith("/spec/") and not S.SPEC.is_dir():
            continue  # an installation without the source checkout's spec/
        status, body, _ = call(server, "GET", path)
        assert status == 200, href
        if anchor:
            assert f'id="{anchor}"'.encode() in body, href
    assert call(server, "GET", "/ref/os.system")[0] == 404  # only the listed names are served


def test_a_closed_event_stream_stops_its_sessions_run(server):
    sid = new_session(server)
    conn = http.client.HTTPConnection(*server.server_address[:2], timeout=30)
    conn.request("GET", f"/api/events?session={sid}")
    stream = conn.getresponse()
    rid = start_run(server, sid, steps=2000, rank=4)
    seen = bytearray()
    wait_for(lambda: seen.extend(stream.fp.read1(65536)) or b"event: point" in seen, 30, "a point on the stream")
    run = server.lab.sessions[sid].runs[rid]
    stream.close()
    conn.close()  # the tab is gone
    t0 = time.monotonic()
    wait_for(lambda: run.status == "stopped", S.CLOSE_GRACE_S + 10, "the run to stop")
    print(f"\nclosed stream -> run stopped after {time.monotonic() - t0:.1f} s at step {run.points[-1]['step']}")
    assert run.points[-1]["step"] < 2000 and sid not in server.lab.sessions


def test_runs_are_bounded_and_queued_beyond_the_workers(server, monkeypatch):
    monkeypatch.setattr(S, "MAX_QUEUED", 1)
    wait_for(lambda: server.lab.active == 0, 30, "earlier runs to end")
    sid = new_session(server)
    ids = [start_run(server, sid, steps=2000, rank=2) for _ in range(3)]
    status, body, _ = call(server, "POST", "/api/runs", {"session": sid, "params": {"steps": 2000}})
    assert status == 429 and "limit" in body["error"]
    runs = [server.lab.sessions[sid].runs[i] for i in ids]
    wait_for(lambda: sum(r.status == "running" for r in runs) == 2, 30, "two runs running")
    assert [r.status for r in runs].count("queued") == 1
    for rid in ids:
        assert call(server, "POST", f"/api/runs/{rid}/stop", {"session": sid})[0] == 200
    wait_for(lambda: all(r.status == "stopped" for r in runs), 30, "the runs to stop")


def test_exports_curves_and_a_peft_adapter_and_merges_two_adapters(server, tmp_path):
    from refimpl import io as rio

    sid = new_session(server)
    a = start_run(server, sid, task="facts_low", steps=100, examples=300)
    b = start_run(server, sid, task="facts_high", steps=40, examples=300, dora=True, layers="qv")
    ra = wait_for(lambda: finished(server, sid, a), 60, "run A")
    rb = wait_for(lambda: finished(server, sid, b), 60, "run B")
    assert ra.status == rb.status == "done" and ra.diagnosis["label"] in LABELS
    status, body, headers = call(server, "GET", f"/api/runs/{a}/export?format=json&session={sid}")
    assert status == 200 and body["curve"]["step"][-1] == 100 and "attachment" in headers["Content-Disposition"]
    status, csv_bytes, _ = call(server, "GET", f"/api/runs/{a}/export?format=csv&session={sid}")
    assert csv_bytes.decode().splitlines()[0] == "step,train_loss,val_loss,train_acc,val_acc"
    for rid, run in ((a, ra), (b, rb)):
        status, zbytes, _ = call(server, "GET", f"/api/runs/{rid}/export?format=peft&session={sid}")
        assert status == 200
        zipfile.ZipFile(io.BytesIO(zbytes)).extractall(tmp_path / rid)
        config, tensors = rio.load_peft_adapter(next((tmp_path / rid).iterdir()))
        assert config["peft_type"] == "LORA" and config["r"] == 8 and config["use_dora"] == (rid == b)
        for key, arr in run.adapter.items():
            layer, kind = key.rsplit(".", 1)
            suffix = {"lora_A": "lora_A.weight", "lora_B": "lora_B.weight", "lora_magnitude": "lora_magnitude_vector"}
            np.testing.assert_array_equal(tensors[f"base_model.model.{layer}.{suffix[kind]}"], arr.astype(np.float32))
    assert list(server.lab.tmp.iterdir()) == []  # export folders are removed once zipped
    status, res, _ = call(server, "POST", "/api/merge", {"session": sid, "a": a, "b": b, "ties_density": 0.3})
    assert status == 200, res
    assert [r["method"] for r in res["rows"]][:4] == ["base", "A only", "B only", "average"]
    assert any(r["method"].startswith("TIES d=0.3") for r in res["rows"])
    assert any(r["method"].startswith("DARE") for r in res["rows"])
    acc = {r["method"]: r[res["series"][0]]["acc"] for r in res["rows"]}
    assert acc["A only"] > acc["base"] + 0.15  # adapter A learned its task
    status, body, _ = call(server, "POST", "/api/merge", {"session": sid, "a": a, "b": b, "ties_density": 7})
    assert (status, body["field"]) == (400, "ties_density")


def test_temporary_folder_is_the_only_place_written_and_is_removed():
    before = set(os.listdir(tempfile.gettempdir()))
    srv = S.LabServer("127.0.0.1", 0)
    tmp = srv.lab.tmp
    assert tmp.parent == Path(tempfile.gettempdir()) and tmp.name not in before
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    srv.close()
    assert not tmp.exists()


def test_cli_serve_prints_its_url_on_loopback_and_serves_the_page():
    proc = subprocess.Popen(
        [sys.executable, "-m", "refimpl.lab.cli", "serve", "--port", "0", "--no-warm"],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        line = proc.stdout.readline()
        print("\n" + line.strip())
        assert line.startswith("refimpl lab serve: http://127.0.0.1:")
        port = int(line.split("http://127.0.0.1:", 1)[1].split("/", 1)[0])
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
        conn.request("GET", "/")
        assert conn.getresponse().status == 200
    finally:
        proc.terminate()
        proc.wait(10)
    tmp = Path(line.split("temporary folder ", 1)[1].rstrip(")\n"))
    assert tmp.name.startswith("refimpl-lab-serve-") and not tmp.exists()  # SIGTERM cleans up as Ctrl-C does
    bad = subprocess.run(
        [sys.executable, "-m", "refimpl.lab.cli", "serve", "--port", "70000"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert bad.returncode == 2 and "--port" in bad.stderr


# --------------------------------------------------------------------------- the page in Chromium


def _browser():
    """A headless Debian Chromium through selenium, or pytest.skip saying what is missing."""
    try:
        from selenium import webdriver
        from selenium.webdriver.chrome.options import Options
        from selenium.webdriver.chrome.service import Service
    except ImportError:
        pytest.skip("no browser: selenium is not installed (pip install -e '.[test]')")
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    driver = shutil.which("chromedriver")
    if not chromium or not driver:
        pytest.skip(
            "no browser: Debian's chromium and chromium-driver are not installed "
            "(apt-get install -y chromium chromium-driver; .ci/run does this)"
        )
    opts = Options()
    opts.binary_location = chromium
    profile = tempfile.mkdtemp(prefix="lab-serve-chromium-")
    for arg in (
        "--headless=new",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--disable-dev-shm-usage",
        f"--user-data-dir={profile}",
        "--window-size=1500,1080",
    ):
        opts.add_argument(arg)
    return webdriver.Chrome(service=Service(driver), options=opts), profile


@pytest.fixture(scope="module")
def browser():
    drv, profile = _browser()
    yield drv
    drv.quit()
    shutil.rmtree(profile, ignore_errors=True)


def _points(drv, rid: str, kind: str) -> int:
    return drv.execute_script(
        "const p = document.querySelector(`#plot polyline[data-run='${arguments[0]}'][data-kind='${arguments[1]}']`);"
        "return p ? p.getAttribute('points').trim().split(' ').length : 0;",
        rid,
        kind,
    )


def _attr(drv, css: str, attr: str):
    """An attribute read in one script call (the page redraws often; a held element would go stale)."""
    return drv.execute_script(
        "const e = document.querySelector(arguments[0]); return e ? e.getAttribute(arguments[1]) : null;", css, attr
    )


def _text(drv, css: str) -> str:
    return drv.execute_script("const e = document.querySelector(arguments[0]); return e ? e.textContent : '';", css)


def _set(drv, name: str, value) -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select

    e = drv.find_element(By.ID, f"ctl-{name}")
    if e.tag_name == "select":
        Select(e).select_by_value(value)
    elif e.get_attribute("type") == "checkbox":
        if e.is_selected() != value:
            e.click()
    else:
        e.clear()
        e.send_keys(str(value))


def _train(drv, server, timeout: float = 90, shot: Path | None = None) -> tuple[str, dict]:
    """Click Train, check both curves grow (screenshot ``shot`` then, mid-run), wait for the run to end;
    returns (run id, timings in ms)."""
    from selenium.webdriver.common.by import By

    known = set(drv.execute_script("return Object.keys(window.labTimings)"))
    drv.find_element(By.ID, "train").click()
    rid = wait_for(
        lambda: (set(drv.execute_script("return Object.keys(window.labTimings)")) - known or {None}).pop(),
        10,
        "the run to be accepted",
    )
    wait_for(lambda: _points(drv, rid, "train") >= 1 and _points(drv, rid, "val") >= 1, 30, "the first points")
    first = (_points(drv, rid, "train"), _points(drv, rid, "val"))
    wait_for(
        lambda: _points(drv, rid, "train") > first[0] + 2 and _points(drv, rid, "val") > first[1] + 2,
        timeout,
        "both curves to grow",
    )
    if shot is not None:
        drv.save_screenshot(str(shot))
    wait_for(
        lambda: drv.execute_script("return window.labTimings[arguments[0]].end !== undefined", rid),
        timeout,
        "the run to end",
    )
    return rid, drv.execute_script("return window.labTimings[arguments[0]]", rid)


def test_the_sandbox_in_chromium(server, browser, tmp_path, capsys):
    """Controls, Train with live curves, the diagnosis and tree, failure modes, merge, a closed tab.

    Screenshots go to $REFIMPL_SCREENSHOT_DIR (``docs`` refreshes the committed ones), else a temporary
    folder: a test run never rewrites tracked files. The timings are printed into the test log."""
    shots = Path(os.environ.get("REFIMPL_SCREENSHOT_DIR") or tmp_path)
    shots.mkdir(parents=True, exist_ok=True)

    def log(text: str) -> None:
        with capsys.disabled():
            print(text)

    from selenium.webdriver.common.by import By

    drv = browser
    drv.get(server.url)
    wait_for(lambda: drv.execute_script("return document.body.dataset.ready === '1'"), 15, "the page")
    wait_for(lambda: server.lab.bases.ready(), 60, "the base model (pretrained at server start)")

    # a bad value: the server's 400 names the field, the page marks it
    _set(drv, "rank", 0)
    drv.find_element(By.ID, "train").click()
    wait_for(lambda: "rank" in _text(drv, "#form-error"), 10, "the field error")
    assert "bad" in drv.find_element(By.ID, "row-rank").get_attribute("class")

    # the lesson's experiment 1 in two runs: rank 16, then rank 1; both stay on the plot
    for name, value in (
        ("task", "facts"),
        ("rank", 16),
        ("layers", "all"),
        ("dropout", 0.05),
        ("weight_decay", 0.01),
        ("examples", 2000),
        ("steps", 300),
        ("dora", False),
        ("nf4", False),
        ("seed", 0),
    ):
        _set(drv, name, value)
    rid, t = _train(drv, server, shot=shots / "lab-serve-streaming.png")
    label = _attr(drv, "#diagnosis-label", "data-label")
    log(
        f"\nrank 16, default run: first point {t['first']:.0f} ms after Train, end {t['end'] / 1000:.1f} s, "
        f"diagnosis {label}"
    )
    assert label == "healthy" and t["first"] < 2000 and t["end"] < 60_000
    assert "The lesson's fix" in _text(drv, "#diagnosis")
    assert drv.find_elements(By.CSS_SELECTOR, "#tree g.on[data-node='healthy']")
    drv.save_screenshot(str(shots / "lab-serve-train.png"))
    _set(drv, "rank", 1)
    _set(drv, "steps", 200)
    _, t1 = _train(drv, server)
    log(f"rank 1: first point {t1['first']:.0f} ms, end {t1['end'] / 1000:.1f} s")
    assert _attr(drv, "#diagnosis-label", "data-label") == "rank_too_low"
    assert drv.find_elements(By.CSS_SELECTOR, "#tree g.on[data-node='rank_too_low']")
    assert _points(drv, rid, "val") > 10  # the first run is still drawn
    drv.save_screenshot(str(shots / "lab-serve-two-runs.png"))

    # failure-mode tabs: the lab trains the planted configurations and diagnose() names each
    drv.find_element(By.CSS_SELECTOR, "#tabs button[data-view='failures']").click()
    t0 = time.monotonic()
    for mode in ("rank_too_low", "wrong_layers", "overfitting"):
        drv.find_element(By.CSS_SELECTOR, f"#fm-tabs button[data-mode='{mode}']").click()
        chip = f".fm-diagnosis[data-mode='{mode}'] .chip"
        got = wait_for(lambda c=chip: _attr(drv, c, "data-label"), 90, f"the {mode} run")
        assert got == mode
        if mode == "wrong_layers":
            drv.save_screenshot(str(shots / "lab-serve-wrong-layers.png"))
    assert (
        wait_for(lambda: _attr(drv, ".fm-diagnosis[data-mode='healthy'] .chip", "data-label"), 60, "the healthy run")
        == "healthy"
    )
    log(f"failure modes: 4 runs in {time.monotonic() - t0:.1f} s")
    drv.save_screenshot(str(shots / "lab-serve-failure-modes.png"))

    # merge view: the lesson's pair, then the four merges as bars
    drv.find_element(By.CSS_SELECTOR, "#tabs button[data-view='sandbox']").click()
    _set(drv, "rank", 8)
    _set(drv, "steps", 120)
    drv.find_element(By.CSS_SELECTOR, "#tabs button[data-view='merge']").click()
    drv.find_element(By.ID, "merge-pair").click()
    has = "return [...document.querySelectorAll('#merge-b option')].map(o => o.textContent).join(' ')"
    wait_for(
        lambda: "facts_high" in drv.execute_script(has) and "facts_low" in drv.execute_script(has), 90, "both adapters"
    )
    drv.find_element(By.ID, "merge-go").click()
    wait_for(lambda: drv.execute_script("return document.getElementById('bars').dataset.done === '1'"), 30, "bars")
    assert len(drv.find_elements(By.CSS_SELECTOR, "#bars rect.bar")) == 7 * 3
    table = _text(drv, "#merge-table")
    assert "TIES" in table and "DARE" in table and "A: facts_low" in table and "B: facts_high" in table
    drv.save_screenshot(str(shots / "lab-serve-merge.png"))

    # in a second tab: Stop ends a run; closing the tab stops the next one
    main = drv.current_window_handle
    drv.switch_to.new_window("tab")
    drv.get(server.url)
    wait_for(lambda: drv.execute_script("return document.body.dataset.ready === '1'"), 15, "the second page")
    sid = drv.execute_script("return document.body.dataset.session")
    _set(drv, "steps", 2000)
    runs = server.lab.sessions[sid].runs
    drv.find_element(By.ID, "train").click()
    stopped = wait_for(lambda: next(iter(runs.values()), None), 10, "the first run")
    wait_for(lambda: len(stopped.points) >= 3, 30, "three points")
    drv.find_element(By.ID, "stop").click()
    wait_for(lambda: stopped.status == "stopped", 10, "Stop to end the run")
    wait_for(lambda: _text(drv, "#runs tbody").count("stopped") == 1, 10, "the page to show it stopped")
    assert stopped.points[-1]["step"] < 2000 and stopped.diagnosis["partial"]
    drv.find_element(By.ID, "train").click()
    run = wait_for(lambda: next((r for r in list(runs.values()) if r is not stopped), None), 10, "the second run")
    wait_for(lambda: run.points, 30, "its first point")
    drv.close()
    drv.switch_to.window(main)
    t0 = time.monotonic()
    wait_for(lambda: run.status == "stopped", S.CLOSE_GRACE_S + 10, "the closed tab's run to stop")
    log(f"closed tab: run stopped {time.monotonic() - t0:.1f} s later, at step {run.points[-1]['step']} of 2000")
    logs = [e for e in drv.get_log("browser") if e["level"] == "SEVERE" and "/api/runs" not in e["message"]]
    assert not logs, logs  # no failed asset, no script error (the rank=0 400 is expected)
