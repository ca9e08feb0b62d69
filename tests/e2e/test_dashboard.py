"""End to end: the dashboard in a real headless Chromium, against a real farm building a DAG.

The builder of one derivation prints a line, then waits until the test creates a file in a
directory mapped into the build sandbox (``/gate``): so the test knows the step is still
running when it looks for that line on the page, and no sleep stands in for "meanwhile".
Screenshots go to the test's directory, and with ``--screenshots DIR`` into DIR too.
"""

from __future__ import annotations

import re
import shutil
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import httpx
import pytest

from tests.conftest import wait_until
from tests.e2e.browser import chromium_context
from tests.e2e.conftest import Farm, Proc

if TYPE_CHECKING:
    from playwright.sync_api import BrowserContext, Page

pytestmark = [pytest.mark.e2e, pytest.mark.nix]

WAIT_MS = 60_000
GATE_POLLS = 1200
"""The gated builder gives up after this many 50 ms polls (one minute): a test that died
must not leave a build hanging."""


def _gated_dag(root: Path, gate_dir: Path) -> Path:
    """Four leaves and a gated step under ``top``, and ``broken``, which fails."""
    salt = uuid.uuid4().hex
    path = root / f"gated-{salt[:8]}.nix"
    path.write_text(
        f"""
let
  sh = name: script: extra: derivation ({{
    inherit name;
    salt = "{salt}";
    system = builtins.currentSystem;
    builder = "/bin/sh";
    PATH = "/usr/bin:/bin";
    args = [ "-c" script ];
  }} // extra);
  waitFor = gate: ''
    i=0
    while [ ! -e /gate/${{gate}} ]; do
      i=$((i + 1))
      if [ $i -gt {GATE_POLLS} ]; then echo "gave up waiting for ${{gate}}" >&2; exit 1; fi
      sleep 0.05
    done
  '';
  leaf = i:
    sh "leaf-${{toString i}}" "echo building leaf ${{toString i}}; echo ${{toString i}} > $out";
  leaves = builtins.genList (i: leaf i {{ }}) 4;
  gated = sh "gated" ''
    echo "gated: first line, before gate one"
    ${{waitFor "one"}}
    echo "gated: second line, after gate one"
    ${{waitFor "two"}}
    echo "gated: last line"
    echo ok > $out
  '' {{ }};
in
{{
  top = sh "top" "echo $leaves $gated > $out" {{ inherit leaves gated; }};
  broken = sh "broken"
    "echo compiling broken; echo 'error: broken fails on purpose' >&2; exit 1" {{ }};
}}
"""
    )
    assert gate_dir.is_dir()
    return path


@pytest.fixture
def browser(tmp_path: Path) -> Iterator[BrowserContext]:
    yield from chromium_context(tmp_path / "chromium-profile")


@pytest.fixture
def shoot(tmp_path: Path, request: pytest.FixtureRequest) -> Callable[[Page, str], Path]:
    """Save a screenshot of the page (into --screenshots DIR too, when given)."""
    extra: str | None = request.config.getoption("--screenshots")

    def take(page: Page, name: str) -> Path:
        out = tmp_path / "screenshots" / f"{name}.png"
        out.parent.mkdir(exist_ok=True)
        page.screenshot(path=str(out), full_page=True)
        if extra:
            Path(extra).mkdir(parents=True, exist_ok=True)
            shutil.copyfile(out, Path(extra) / out.name)
        return out

    return take


def _api(farm: Farm, path: str) -> Any:
    with farm.api() as c:
        resp = c.get(path)
        resp.raise_for_status()
        return resp.json()


def _steps_by_name(farm: Farm, build_id: int) -> dict[str, dict[str, Any]]:
    return {s["name"]: s for s in _api(farm, f"/api/v1/builds/{build_id}/steps")["steps"]}


def _submit(farm: Farm, nix_file: Path, *attrs: str) -> tuple[Proc, int]:
    args = ["build", str(nix_file), *(a for attr in attrs for a in ("-A", attr)), "--no-download"]
    proc = farm._spawn("build", args, farm.env())

    def created() -> bool:
        if proc.popen.poll() is not None and not _api(farm, "/api/v1/builds")["builds"]:
            raise AssertionError("bigtent build exited early:\n" + proc.log.read_text()[-3000:])
        return bool(_api(farm, "/api/v1/builds")["builds"])

    wait_until(created, timeout=60, what="the build to be created")
    return proc, int(_api(farm, "/api/v1/builds")["builds"][0]["id"])


def _step_state(farm: Farm, build_id: int, name: str) -> str:
    return str(_steps_by_name(farm, build_id)[name]["state"])


def test_dashboard_follows_a_dag_build_live(
    farm_factory: Callable[..., Farm],
    browser: BrowserContext,
    shoot: Callable[[Page, str], Path],
    tmp_path: Path,
) -> None:
    from playwright.sync_api import expect

    gate = tmp_path / "gate"
    gate.mkdir()
    sandbox = [f"/gate={gate}"]
    farm = farm_factory(agents=2, sandbox_paths=sandbox)
    farm.start_agent(
        "eph",
        max_jobs=1,
        extra_args=["--ephemeral", "--max-idle-secs", "600"],
        sandbox_paths=sandbox,
        wait=False,
    )
    wait_until(
        lambda: any(
            a["ephemeral"] and a["connected"] for a in _api(farm, "/api/v1/agents")["agents"]
        ),
        timeout=30,
        what="the ephemeral agent to connect",
    )
    eph_name = next(a["name"] for a in _api(farm, "/api/v1/agents")["agents"] if a["ephemeral"])
    build_proc, build_id = _submit(farm, _gated_dag(farm.root, gate), "top", "broken")
    wait_until(
        lambda: _step_state(farm, build_id, "gated") == "building",
        timeout=60,
        what="the gated step to start building",
    )

    # Sign in as an admin through the form (the admin actions then show).
    page = browser.new_page()
    page.goto(farm.url + "/login")
    page.fill("#token", farm.admin_token)
    page.click("form[action='/login'] button")
    expect(page.locator("header .who")).to_contain_text("admin (admin)", timeout=WAIT_MS)
    assert page.url == farm.url + "/"

    # Overview: the connected agents, by kind, and the running step.
    online = page.locator("#online-agents")
    for name in ("a0", "a1", eph_name):
        expect(online).to_contain_text(name, timeout=WAIT_MS)
    expect(page.locator("#agents-online .value")).to_have_text("3")
    expect(page.locator("#running")).to_contain_text("gated", timeout=WAIT_MS)
    shoot(page, "overview")

    # Agents page: the ephemeral agent is marked as such, the persistent ones are not.
    page.goto(farm.url + "/agents")
    eph_row = page.locator(f'#agents tr[data-name="{eph_name}"]')
    expect(eph_row).to_have_attribute("data-ephemeral", "true")
    expect(eph_row.locator(".badge.ephemeral")).to_have_text("ephemeral")
    expect(page.locator('#agents tr[data-name="a0"] .badge.persistent')).to_have_text("persistent")
    shoot(page, "agents")

    # The build page, left open: it must reach 100 % by itself (no reload).
    build_page = browser.new_page()
    build_page.goto(f"{farm.url}/builds/{build_id}")
    percent = int(build_page.locator("#progress .progress").get_attribute("data-percent") or "-1")
    assert 0 <= percent < 100
    expect(build_page.locator("form[action$='/cancel'] button")).to_be_visible()
    build_page.evaluate("window.__sameDocument = 42")
    shoot(build_page, "build-running")

    # The gated step's page: lines the builder prints while it runs appear live.
    gated_id = int(_steps_by_name(farm, build_id)["gated"]["id"])
    page.goto(f"{farm.url}/steps/{gated_id}")
    log = page.locator("#log")
    expect(log).to_contain_text("first line, before gate one", timeout=WAIT_MS)
    expect(page.locator("#log-status")).to_have_text("live", timeout=WAIT_MS)
    page.evaluate("window.__sameDocument = 42")
    (gate / "one").touch()
    expect(log).to_contain_text("second line, after gate one", timeout=WAIT_MS)
    # The builder is now waiting on gate two: the line arrived while the step runs.
    assert _step_state(farm, build_id, "gated") == "building"
    assert page.evaluate("window.__sameDocument") == 42
    shoot(page, "step-live")
    (gate / "two").touch()
    expect(log).to_contain_text("gated: last line", timeout=WAIT_MS)
    expect(page.locator("#log-status")).to_have_text("finished: succeeded", timeout=WAIT_MS)
    assert page.evaluate("window.__sameDocument") == 42
    assert log.inner_text().count("first line, before gate one") == 1  # no line twice
    # The step's details were refreshed in place.
    expect(page.locator("#step-info h1 .badge")).to_have_text("succeeded", timeout=WAIT_MS)

    # The build page got there on its own.
    expect(build_page.locator('#progress .progress[data-percent="100"]')).to_be_visible(
        timeout=WAIT_MS
    )
    assert build_page.evaluate("window.__sameDocument") == 42
    expect(build_page.locator("#build-state .badge")).to_have_text("failed")
    # The failed step comes first, with the end of its log.
    failure = build_page.locator("#failures .failure").first
    expect(failure).to_contain_text("broken")
    expect(failure.locator("pre.tail")).to_contain_text("broken fails on purpose")
    first_row = build_page.locator("#steps tr[data-state]").first
    expect(first_row).to_have_attribute("data-state", "failed")
    # Every attempt is listed, the failed one with its agent and reason.
    failed_attempt = build_page.locator('#attempts tr[data-outcome="build_failure"]')
    expect(failed_attempt).to_contain_text("broken")
    expect(failed_attempt).to_contain_text(
        str(_steps_by_name(farm, build_id)["broken"]["agent_name"])
    )
    expect(failed_attempt).to_contain_text("final")
    shoot(build_page, "build")
    assert build_proc.popen.wait(60) != 0  # `broken` failed

    # Search by output path finds the step.
    out_path = _steps_by_name(farm, build_id)["gated"]["outputs"]["out"]
    page.goto(f"{farm.url}/search?q={out_path}")
    expect(page.locator("#found-steps")).to_contain_text("gated")
    expect(page.locator("#found-paths")).to_contain_text(out_path)
    shoot(page, "search")


def test_pages_render_without_javascript(farm_factory: Callable[..., Farm]) -> None:
    """Plain HTTP, no browser: every page is a full document with the data in it."""
    farm = farm_factory(agents=1)
    code, out = farm.build_json(str(farm.dag_file(layers=2, width=2)), "-A", "top")
    assert code == 0, out
    build_id = int(out["build_id"])
    steps = _steps_by_name(farm, build_id)
    top = steps["dag-top-0"]
    with httpx.Client(base_url=farm.url, timeout=30) as c:
        overview = c.get("/")
        assert overview.status_code == 200
        assert overview.headers["content-type"].startswith("text/html")
        assert "a0" in overview.text
        assert f'href="/builds/{build_id}"' in overview.text
        build = c.get(f"/builds/{build_id}").text
        assert 'data-percent="100"' in build
        for name in steps:
            assert name in build
        # One attempt per step, each a success on the one agent.
        attempts = build[build.index('id="attempts"') :]
        assert attempts.count('data-outcome="success"') == len(steps)
        step = c.get(f"/steps/{top['id']}").text
        assert top["drv_path"] in step
        assert "building node top-0" in step  # the stored log, in the page
        assert "data-events" not in step  # finished: nothing to follow
        raw = c.get(f"/steps/{top['id']}/log")
        assert raw.status_code == 200 and "building node top-0" in raw.text
        part = c.get(f"/steps/{top['id']}/log", headers={"Range": "bytes=0-7"})
        assert part.status_code == 206 and part.text == "building"
        agents = c.get("/agents").text
        assert re.search(
            r'data-name="a0"[^>]*data-ephemeral="false"[^>]*data-connected="true"', agents
        )
        found = c.get("/search", params={"q": top["outputs"]["out"]}).text
        assert f'href="/steps/{top["id"]}"' in found
        # Security headers on every page.
        assert "script-src 'self'" in overview.headers["content-security-policy"]
        # The API's log route serves ranges too; `bigtent log` still prints the whole log.
        with farm.api(farm.client_token) as api:
            tail = api.get(f"/api/v1/steps/{top['id']}/log", headers={"Range": "bytes=-1"})
            assert tail.status_code == 206 and tail.text == "\n"
    printed = farm.bigtent("log", str(top["id"]), check=True)
    assert "building node top-0" in printed.stdout
