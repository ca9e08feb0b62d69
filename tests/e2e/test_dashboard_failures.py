"""End to end: how the dashboard shows failures, in a real headless Chromium against a real
farm (docs/dashboard.md).

One build fails a step whose log is long (the error is its last line) and a step that
depends on it; a second build of the same derivation, by another token and for another ref,
hits the failure cache. Then: the failed step's log tail and the step's log page show the
end of the log (the error line in view), the first build still shows the attempt that ran
(not the second build's cache hit), the second build says it hit the cache and links the
attempt that ran, the dependency-failed step links the dependency that failed, and the
all-builds page filters and pages.

With ``--screenshots DIR`` the failed build's page goes to ``DIR/build-failed-after.png``
(``build-failed-before.png`` is the same page before these fixes), the build that hit the
cache to ``build-cached-failure.png`` and the all-builds page to ``builds.png``.
"""

from __future__ import annotations

import shutil
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

from tests.e2e.browser import chromium_context
from tests.e2e.conftest import Farm

if TYPE_CHECKING:
    from playwright.sync_api import BrowserContext, Locator, Page

pytestmark = [pytest.mark.e2e, pytest.mark.nix]

WAIT_MS = 60_000
NOISE_LINES = 150


def _failing_file(root: Path) -> Path:
    """``noisy`` prints many lines, then its error, and fails; ``after`` depends on it."""
    salt = uuid.uuid4().hex
    path = root / f"failing-{salt[:8]}.nix"
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
  noisy = sh "noisy" ''
    i=1
    while [ $i -le {NOISE_LINES} ]; do echo "compiling unit $i of {NOISE_LINES}"; i=$((i + 1)); done
    echo "error: noisy: undefined reference to 'frobnicate' (the last line)" >&2
    exit 1
  '' {{ }};
in
{{
  inherit noisy;
  after = sh "after" "echo $noisy > $out" {{ inherit noisy; }};
}}
"""
    )
    return path


@pytest.fixture
def browser(tmp_path: Path) -> Iterator[BrowserContext]:
    yield from chromium_context(tmp_path / "chromium-profile")


def _shoot(page: Page, request: pytest.FixtureRequest, tmp_path: Path, name: str) -> None:
    out = tmp_path / f"{name}.png"
    page.screenshot(path=str(out), full_page=True)
    extra: str | None = request.config.getoption("--screenshots")
    if extra:
        Path(extra).mkdir(parents=True, exist_ok=True)
        shutil.copyfile(out, Path(extra) / out.name)


def _api(farm: Farm, path: str) -> Any:
    with farm.api() as c:
        resp = c.get(path)
        resp.raise_for_status()
        return resp.json()


def _steps_by_name(farm: Farm, build_id: int) -> dict[str, dict[str, Any]]:
    return {s["name"]: s for s in _api(farm, f"/api/v1/builds/{build_id}/steps")["steps"]}


def _in_view(box: Locator, text: str) -> bool:
    """Whether the line holding ``text`` is inside the visible part of the scroll box."""
    return bool(
        box.evaluate(
            """(el, text) => {
                const walker = document.createTreeWalker(el, NodeFilter.SHOW_TEXT);
                let node;
                while ((node = walker.nextNode())) {
                    const at = node.textContent.indexOf(text);
                    if (at < 0) continue;
                    const range = document.createRange();
                    range.setStart(node, at);
                    range.setEnd(node, at + text.length);
                    const r = range.getBoundingClientRect();
                    const b = el.getBoundingClientRect();
                    return r.top >= b.top - 1 && r.bottom <= b.bottom + 1;
                }
                return false;
            }""",
            text,
        )
    )


def test_failed_builds_on_the_dashboard(
    farm_factory: Callable[..., Farm],
    browser: BrowserContext,
    request: pytest.FixtureRequest,
    tmp_path: Path,
) -> None:
    from playwright.sync_api import expect

    farm = farm_factory(agents=1)
    nix_file = _failing_file(farm.root)
    code, first = farm.build_json(
        str(nix_file), "-A", "after", "--repository", "acme/widgets", "--ref", "refs/heads/main"
    )
    assert code != 0 and first["state"] == "failed", first
    first_id = int(first["build_id"])
    ran = _steps_by_name(farm, first_id)
    noisy, after = ran["noisy"], ran["after"]
    assert (noisy["state"], after["state"]) == ("failed", "dependency_failed")
    # The same derivation again, by another token, for another ref: a cached failure.
    code, second = farm.build_json(
        str(nix_file),
        "-A",
        "noisy",
        "--repository",
        "acme/widgets",
        "--ref",
        "refs/heads/feature",
        token=farm.admin_token,
    )
    assert code != 0 and second["state"] == "failed", second
    second_id = int(second["build_id"])
    assert second_id != first_id
    # The API: the hit is the second build's; the first keeps the error of the attempt.
    hit_step = _steps_by_name(farm, second_id)["noisy"]
    assert hit_step["error"].startswith("cached failure: this derivation failed (build_failure)")
    assert hit_step["cached_failure"]["ran_in_build"] == first_id
    assert hit_step["cached_failure"]["agent_name"] == "a0"
    ran_step = _steps_by_name(farm, first_id)["noisy"]
    assert "cached_failure" not in ran_step
    assert ran_step["error"] == noisy["error"] and "cached failure" not in ran_step["error"]
    [failed] = _api(farm, f"/api/v1/builds/{second_id}")["failed_steps"]
    assert failed["error"].startswith("cached failure") and failed["cached_failure"]

    page = browser.new_page()
    page.goto(f"{farm.url}/builds/{first_id}")
    failure = page.locator("#failures .failure").first
    expect(failure).to_contain_text("noisy")
    _shoot(page, request, tmp_path, "build-failed-after")

    # Item 8: the tail box shows its end (the error line) without scrolling by hand.
    last_line = "undefined reference to 'frobnicate' (the last line)"
    tail = failure.locator(".tail")
    expect(tail).to_contain_text(last_line)
    assert _in_view(tail, last_line), "the error line is hidden below the tail box's fold"
    assert not _in_view(tail, f"compiling unit 1 of {NOISE_LINES}")
    expect(failure.locator("a.whole-log")).to_have_attribute("href", f"/steps/{noisy['id']}/log")

    # Item 9: the build that ran the step keeps that attempt's record.
    expect(failure).not_to_contain_text("cached failure")
    expect(failure.locator(".error-text")).to_contain_text("builder")
    noisy_row = page.locator(f'#steps tr[data-step="{noisy["id"]}"]')
    expect(noisy_row).to_contain_text("a0")
    expect(noisy_row).not_to_contain_text("cached failure")
    expect(page.locator('#attempts tr[data-outcome="build_failure"]')).to_contain_text("a0")
    expect(page.locator('#attempts tr[data-outcome="cached_failure"]')).to_have_count(0)

    # Item 10: the dependency-failed step names (and links) the dependency that failed.
    after_row = page.locator(f'#steps tr[data-step="{after["id"]}"]')
    expect(after_row.locator(f'a.failed-dep[href="/steps/{noisy["id"]}"]')).to_have_text("noisy")
    page.goto(f"{farm.url}/steps/{after['id']}")
    expect(page.locator(f'#failed-deps a[href="/steps/{noisy["id"]}"]')).to_contain_text("noisy")
    expect(page.locator(".logbox")).to_have_count(0)

    # Item 8 again: a finished step's page shows the end of its log.
    page.goto(f"{farm.url}/steps/{noisy['id']}")
    logbox = page.locator(".logbox")
    expect(logbox).to_contain_text(last_line)
    assert _in_view(logbox, last_line)
    assert not _in_view(logbox, f"compiling unit 1 of {NOISE_LINES}")
    # The step's own attempt: its agent and a real run time.
    attempt = page.locator('#attempts tr[data-outcome="build_failure"]')
    expect(attempt).to_contain_text("a0")
    expect(page.locator("#attempts tr[data-outcome]")).to_have_count(1)
    # Its builds: the one that ran it, and the one that reused its failure, marked so.
    builds_line = page.locator("#step-builds")
    expect(builds_line.locator(f'a[href="/builds/{first_id}"]')).to_have_count(1)
    expect(builds_line.locator(f'a[href="/builds/{second_id}"]')).to_have_count(1)
    expect(builds_line.locator(".cached-in")).to_have_count(1)

    # Item 9: the build that hit the cache says so and links the attempt that ran.
    page.goto(f"{farm.url}/builds/{second_id}")
    hit = page.locator("#failures .failure").first
    expect(hit.locator(".badge")).to_contain_text("cached failure")
    expect(hit).to_contain_text(f"build #{first_id}")
    expect(hit.locator(f'a[href="/builds/{first_id}"]')).to_have_count(1)
    expect(hit.locator(f'a[href^="/steps/{noisy["id"]}#attempt-"]')).to_have_count(1)
    hit_row = page.locator('#attempts tr[data-outcome="cached_failure"]')
    expect(hit_row).to_have_count(1)
    expect(page.locator('#attempts tr[data-outcome="build_failure"]')).to_have_count(0)
    expect(page.locator(f'#steps tr[data-step="{noisy["id"]}"]')).to_contain_text("cached failure")
    _shoot(page, request, tmp_path, "build-cached-failure")

    # Item 10: the all-builds page, its rows and its filters.
    page.goto(f"{farm.url}/builds")
    rows = page.locator("#all-builds tr[data-build]")
    expect(rows).to_have_count(2)
    first_row = page.locator(f'#all-builds tr[data-build="{first_id}"]')
    expect(first_row).to_contain_text("after")
    expect(first_row).to_contain_text("acme/widgets")
    expect(first_row).to_contain_text("refs/heads/main")
    expect(first_row).to_contain_text("client")
    _shoot(page, request, tmp_path, "builds")
    page.goto(f"{farm.url}/builds?ref=refs/heads/feature")
    expect(rows).to_have_count(1)
    expect(page.locator(f'#all-builds tr[data-build="{second_id}"]')).to_contain_text("noisy")
    page.goto(f"{farm.url}/builds?creator=client")
    expect(rows).to_have_count(1)
    expect(page.locator(f'#all-builds tr[data-build="{first_id}"]')).to_be_visible()
    page.goto(f"{farm.url}/builds?state=succeeded&repository=acme/widgets")
    expect(rows).to_have_count(0)
    expect(page.locator("#all-builds-empty")).to_be_visible()
    # The filter form fills the query string.
    page.goto(f"{farm.url}/builds")
    page.fill("#filter-creator", "admin")
    page.click("#build-filters button[type=submit]")
    expect(rows).to_have_count(1)
    expect(page.locator(f'#all-builds tr[data-build="{second_id}"]')).to_be_visible()
    # Paging: one a page, newest first, then the older one through the link.
    page.goto(f"{farm.url}/builds?limit=1&repository=acme/widgets")
    expect(rows).to_have_count(1)
    expect(page.locator(f'#all-builds tr[data-build="{second_id}"]')).to_be_visible()
    page.click("a#older")
    expect(page.locator(f'#all-builds tr[data-build="{first_id}"]')).to_be_visible()
    expect(rows).to_have_count(1)
    assert "repository=acme%2Fwidgets" in page.url or "repository=acme/widgets" in page.url
    # The overview links to it.
    page.goto(farm.url + "/")
    expect(page.locator('a[href="/builds"]').first).to_be_visible()
