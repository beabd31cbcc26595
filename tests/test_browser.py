"""The real browser: chapter 1's explorer works in JupyterLab in Chromium.

JupyterLab runs headless on 127.0.0.1 (free port, token auth, its own config/runtime/data dirs,
``SA_KIT_PROFILE=ci``, offline, a temporary cache); Debian's Chromium, driven by Playwright,
opens a copy of ``notebooks/01_vae_mnist.ipynb``, runs every cell from the Run menu, moves the
explorer's lambda slider with the keyboard, presses Run, and checks that the image and the
metrics table change. No browser is downloaded: the test skips when ``/usr/bin/chromium`` (the
Debian package, installed by ``.ci/run``) or the ``playwright`` package is missing.

The explorer records every run in a table: after Run All it holds the runs the notebook made; a
new run must add a row with the new lambda, a new image and a new trade-off plot.
Set ``SA_KIT_BROWSER_ARTIFACTS=<dir>`` to keep screenshots and the server log, and
``SA_KIT_BROWSER_CACHE=<dir>`` to use (and fill) a lasting cache instead of a temporary one,
e.g. when working on this test.
"""
from __future__ import annotations

import json
import os
import secrets
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOK = ROOT / "notebooks" / "01_vae_mnist.ipynb"
CHROMIUM = "/usr/bin/chromium"
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
                  "--no-first-run", "--disable-background-networking",
                  "--disable-component-update", "--disable-sync"]

try:
    from playwright import sync_api
except ImportError:                                   # pragma: no cover - depends on the env
    sync_api = None

pytestmark = [
    pytest.mark.browser,
    pytest.mark.skipif(not os.access(CHROMIUM, os.X_OK),
                       reason=f"{CHROMIUM} is missing (Debian: apt-get install chromium; "
                              ".ci/run tries this)"),
    pytest.mark.skipif(sync_api is None, reason="the playwright package is missing (pip install "
                                                "playwright; no browser download is needed)"),
]


T0 = time.monotonic()


def _log(msg: str) -> None:
    """Progress on stdout (shown with ``pytest -s``): where a slow run spends its time."""
    print(f"[browser {time.monotonic() - T0:6.1f} s] {msg}", flush=True)


def _die_with_parent() -> None:
    """In the child: get SIGTERM when the test process dies (even by SIGKILL), on Linux."""
    try:
        import ctypes
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, 15)   # PR_SET_PDEATHSIG, SIGTERM
    except (OSError, AttributeError):
        pass


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def jupyter_lab(tmp_path, monkeypatch):
    """A headless JupyterLab on a copy of notebook 01; yields ``(url, log_path)``."""
    if os.environ.get("SA_KIT_BROWSER_CACHE"):
        monkeypatch.setenv("SA_KIT_CACHE", os.environ["SA_KIT_BROWSER_CACHE"])
    work = tmp_path / "lab"
    work.mkdir()
    shutil.copy(NOTEBOOK, work / NOTEBOOK.name)      # autosave must not touch the repository
    port, token = _free_port(), secrets.token_hex(16)
    dirs = {name: tmp_path / name for name in ("config", "runtime", "data", "ipython")}
    for d in dirs.values():
        d.mkdir()
    # no "Select Kernel" dialog, no news/update toasts over the widgets
    settings = dirs["config"] / "lab" / "user-settings" / "@jupyterlab"
    for plugin, values in {"notebook-extension/tracker": {"autoStartDefaultKernel": True},
                           "apputils-extension/notification": {"fetchNews": "false",
                                                               "checkForUpdates": False}}.items():
        path = settings / f"{plugin}.jupyterlab-settings"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(values))
    env = {**os.environ, "SA_KIT_PROFILE": "ci", "SA_KIT_OFFLINE": "1",
           "SA_KIT_CACHE": os.environ["SA_KIT_CACHE"],      # conftest: a temporary one
           "JUPYTER_CONFIG_DIR": str(dirs["config"]), "JUPYTER_RUNTIME_DIR": str(dirs["runtime"]),
           "JUPYTER_DATA_DIR": str(dirs["data"]), "IPYTHONDIR": str(dirs["ipython"]),
           "JUPYTER_PLATFORM_DIRS": "1", "PYTHONUNBUFFERED": "1"}
    log = tmp_path / "jupyter.log"
    cmd = [sys.executable, "-m", "jupyterlab", "--no-browser", "--ServerApp.ip=127.0.0.1",
           f"--ServerApp.port={port}", "--ServerApp.port_retries=0",
           f"--IdentityProvider.token={token}", f"--ServerApp.root_dir={work}",
           f"--LabApp.user_settings_dir={settings.parent}",
           f"--LabApp.workspaces_dir={dirs['config'] / 'lab' / 'workspaces'}",
           "--LabApp.check_for_updates_class=jupyterlab.NeverCheckForUpdate",
           "--LabApp.news_url=None", "--LabApp.extension_manager=readonly"]
    if os.geteuid() == 0:                             # CI containers run as root
        cmd.append("--allow-root")
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT, cwd=work,
                                preexec_fn=_die_with_parent)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            assert proc.poll() is None, "JupyterLab exited:\n" + log.read_text()[-3000:]
            try:
                with urllib.request.urlopen(f"{url}/api/status?token={token}", timeout=5):
                    break
            except OSError:
                assert time.monotonic() < deadline, "JupyterLab did not start:\n" + \
                    log.read_text()[-3000:]
                time.sleep(0.5)
        # token auth is on: without it the API refuses
        with pytest.raises(urllib.error.HTTPError):
            urllib.request.urlopen(f"{url}/api/contents", timeout=5)
        _log(f"JupyterLab is up at {url}")
        yield f"{url}/lab/tree/{NOTEBOOK.name}?token={token}&reset", log
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)
        keep = os.environ.get("SA_KIT_BROWSER_ARTIFACTS")
        if keep:
            shutil.copy(log, Path(keep) / "jupyter.log")


def _error_outputs(page) -> list[str]:
    return page.locator(
        '.jp-OutputArea-output[data-mime-type="application/vnd.jupyter.stderr"]'
        ':has-text("Traceback"), .jp-RenderedText[data-mime-type="application/vnd.jupyter.error"]'
    ).all_inner_texts()


def _wait(page, predicate, what: str, timeout: float) -> None:
    """Poll ``predicate()`` until true; fail early on a cell error, else after ``timeout``."""
    _log(f"waiting for {what}")
    deadline = time.monotonic() + timeout
    while not predicate():
        errors = _error_outputs(page)
        assert not errors, f"a cell failed while waiting for {what}:\n" + "\n".join(errors)[-3000:]
        assert time.monotonic() < deadline, f"timed out after {timeout:.0f} s waiting for {what}"
        page.wait_for_timeout(500)


def test_explorer_updates_in_a_real_browser(jupyter_lab, tmp_path):
    t_start = time.monotonic()
    url, log = jupyter_lab
    shots = Path(os.environ.get("SA_KIT_BROWSER_ARTIFACTS") or tmp_path)
    shots.mkdir(parents=True, exist_ok=True)

    with sync_api.sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_FLAGS,
                                     headless=True)
        page = browser.new_page(viewport={"width": 1400, "height": 1000})
        try:
            _log("opening the notebook")
            page.goto(url, timeout=120_000)
            page.locator(".jp-Notebook .jp-Cell").first.wait_for(timeout=120_000)
            # the kernel is up when the toolbar names it and its status says Idle; should
            # JupyterLab still ask which kernel to start, accept its choice (python3)
            kernel_name = page.locator(".jp-KernelName").first

            def kernel_ready() -> bool:
                accept = page.locator(".jp-Dialog .jp-mod-accept")
                if accept.count():
                    accept.first.click()
                return (page.locator(".jp-Dialog").count() == 0
                        and "No Kernel" not in kernel_name.inner_text()
                        and page.locator('.jp-Notebook-ExecutionIndicator'
                                         '[data-status="idle"]').count() > 0)
            _wait(page, kernel_ready, "the kernel to start", 120)

            _log("kernel idle; Run > Run All Cells")
            page.locator(".lm-MenuBar-item", has_text="Run").first.click()
            run_all = page.locator('.lm-Menu-item[data-command="runmenu:run-all"]').or_(
                page.locator(".lm-Menu-item", has_text="Run All Cells"))
            run_all.first.click()

            image = page.locator(".jupyter-widgets.widget-image").first
            table = page.locator(".widget-html-content:has(table)", has_text="(original)").last
            # the notebook's last cell prints its run time: every cell has run
            _wait(page, lambda: page.locator(".jp-OutputArea-output",
                                             has_text="notebook run time").count() > 0,
                  "Run All to finish", 900)
            _wait(page, lambda: page.locator('.jp-Notebook-ExecutionIndicator'
                                             '[data-status="idle"]').count() > 0,
                  "the kernel to go idle", 120)
            page.screenshot(path=str(shots / "browser-1-after-run-all.png"))
            assert not _error_outputs(page)
            # JupyterLab renders cells off screen lazily: bring the explorer into view first
            def explorer_shown() -> bool:
                try:
                    table.scroll_into_view_if_needed(timeout=2000)
                except Exception:              # not attached yet: poll again
                    return False
                return "lambda=1000" in (table.text_content() or "")

            _wait(page, explorer_shown, "the explorer's run table", 120)
            rows_before = table.locator("tr").count()
            assert rows_before >= 3, table.text_content()     # the original and two runs
            src_before = image.get_attribute("src")
            assert src_before, "the explorer shows an image after Run All"

            # move the lambda slider one notch right with the keyboard: 0 -> 0.1
            slider = page.locator(".widget-hslider", has=page.locator(
                "label", has_text="lambda"))
            readout = slider.locator(".widget-readout")
            def slider_shown() -> bool:
                try:
                    readout.scroll_into_view_if_needed(timeout=2000)
                except Exception:
                    return False
                return readout.inner_text().strip() in ("0.0", "0")

            _wait(page, slider_shown, "the lambda slider at 0 (the notebook's last run)", 60)
            handle = slider.locator(".noUi-handle")
            handle.focus()
            page.keyboard.press("ArrowRight")
            _wait(page, lambda: readout.inner_text().strip() == "0.1",
                  "the lambda slider to move to 0.1", 20)

            page.locator("button.widget-button", has_text="Run").click()
            _wait(page, lambda: table.locator("tr").count() == rows_before + 1
                  and image.get_attribute("src") != src_before,
                  "a new row and a new image", 300)
            page.screenshot(path=str(shots / "browser-2-after-slider-run.png"))
            assert "lambda=0.1," in table.locator("tr").last.text_content()
            assert "lambda=1000" in table.text_content(), "earlier runs stay in the table"
            assert image.evaluate("img => img.complete && img.naturalWidth > 0"), \
                "the new image decodes"
            assert not _error_outputs(page)
        except Exception:
            page.screenshot(path=str(shots / "browser-failure.png"))
            raise
        finally:
            browser.close()
    print(f"\nbrowser test: {time.monotonic() - t_start:.0f} s")
